"""Frames, and the fan-out that offers each one to the viewers of its table, without waiting.

`Fanout.deliver` is the one place a frame the hub applied meets its viewers. A viewer of every
table (protocol v1's, and any without a subscription or a scoped token) is offered every frame; a
viewer that subscribed to some tables, or whose token is scoped, sits in the audience of each
table it wants, so an update costs work per viewer of that table only. An offer never waits
(`Subscriber.offer`): one slow viewer can never hold up a publisher or another viewer.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import attrs
import trio

from .channel import open_conflating_channel
from .metrics import Metrics
from .subscription import Subscription, TableId


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
    # An update's seq; the update before it (`base` its seq), and the patch that turns that one
    # into this one (protocol v1.1, made once on demand: mt5hub.patches), sent instead of this
    # update to a delta viewer that holds `base`. `doc`: the update, parsed, once it was needed.
    seq: int = 0
    base: int = 0
    previous: Frame | None = None
    patch: Frame | None = None
    doc: dict[str, Any] | None = None
    # A snapshot's tables and the seq of each it holds (what a delta viewer holds once sent);
    # `partial`: it adds to what the viewer holds (after a subscribe), rather than replace it.
    seqs: dict[TableId, int] | None = None
    partial: bool = False

    @property
    def table(self) -> TableId | None:
        return None if self.slot is None else (self.slot[1], self.slot[2])


frame_slot = operator.attrgetter("slot")  # what a frame may replace in a conflating channel


class Subscriber(Protocol):
    """Where the hub offers every frame a viewer must see (a ViewerSession, or an Inbox)."""

    def offer(self, frame: Frame) -> bool:
        """Take this frame without waiting; True if it replaced an unsent one of its slot."""
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
        self._conflated = metrics.conflated

    def offer(self, frame: Frame) -> bool:
        try:
            return self.send.send_nowait(frame)
        except trio.WouldBlock:
            self._dropped.inc()
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False  # the connection is over: nobody will read it

    def __len__(self) -> int:
        return len(self.receive)

    def take_batch(self, batch: list[Frame], max_bytes: int) -> list[Frame]:
        """The batch with what waits here, up to `max_bytes` of text, for one write: a newer
        frame of a slot already in the batch takes that frame's place (as it would have here)."""
        size = sum(len(frame.text) for frame in batch)
        where = {frame.slot: n for n, frame in enumerate(batch) if frame.slot is not None}
        receive = self.receive
        while size < max_bytes and len(receive):
            frame = receive.receive_nowait()
            size += len(frame.text)
            if frame.slot is None:
                batch.append(frame)
            elif (n := where.get(frame.slot)) is not None:
                batch[n] = frame
                self._conflated.inc()
            else:
                where[frame.slot] = len(batch)
                batch.append(frame)
        return batch


class Fanout:
    """Every frame the hub applies, offered to every viewer of its table, without waiting.

    Viewers whose peer is behind step `away` meanwhile: every frame offered to them would only
    replace the previous one of its slot, and at a thousand viewers nearly all of them are
    behind at any moment, so those offers are work for nothing. On their way back they are
    offered what they missed: the latest frame of each slot that changed meanwhile.
    """

    def __init__(self, metrics: Metrics, tables: Iterable[TableId]) -> None:
        self.metrics = metrics
        self._tables = tables  # every table the hub knows (its keys), for new subscriptions
        self.viewers: set[Subscriber] = set()
        self._everything: set[Subscriber] = set()  # present viewers of every table
        self._audience: dict[TableId, set[Subscriber]] = {}  # present viewers of some tables
        self._wanted: dict[Subscriber, tuple[Subscription, set[TableId]]] = {}
        self._away: set[Subscriber] = set()
        # The latest frame of each slot, with the number of the frame, in the order they were
        # made: what a viewer back from `away` missed.
        self.count = 0  # frames delivered so far
        self._latest: OrderedDict[object, tuple[int, Frame]] = OrderedDict()
        self._away_marks: list[int] = []  # for each viewer away, the last frame before it left

    def deliver(self, frame: Frame) -> None:
        """Offer this frame to every viewer of its table present; count what it conflated,
        there and away."""
        # Viewers away that missed the previous frame of this slot will never see it now.
        previous = self._latest.get(frame.slot)
        conflated = bisect_left(self._away_marks, previous[0]) if previous is not None else 0
        self.count += 1
        self._latest[frame.slot] = (self.count, frame)
        self._latest.move_to_end(frame.slot)
        for viewer in self._everything:
            conflated += viewer.offer(frame)
        if self._audience and (audience := self._audience.get(frame.table)):  # type: ignore[arg-type]
            for viewer in audience:
                conflated += viewer.offer(frame)
        if conflated:
            self.metrics.conflated.inc(conflated)

    # -- viewers come and go ------------------------------------------------------------------

    @contextmanager
    def subscribed(
        self, viewer: Subscriber, since: int, subscription: Subscription | None = None
    ) -> Iterator[None]:
        """Offer this viewer the frames of the tables it wants while the block runs; first,
        those that changed after frame number `since` (what its snapshot holds)."""
        self.viewers.add(viewer)
        self._join(viewer, subscription)
        if since < self.count:
            self._back(viewer, since)
        try:
            yield
        finally:
            self.viewers.discard(viewer)
            self._leave(viewer)
            self._wanted.pop(viewer, None)
            self._away.discard(viewer)

    def resubscribe(
        self, viewer: Subscriber, subscription: Subscription
    ) -> tuple[set[TableId], set[TableId]]:
        """The viewer's subscription changed: the tables it now gets and no longer gets."""
        before = self.wanted(viewer)
        present = viewer not in self._away
        if present:
            self._leave(viewer)
        self._wanted.pop(viewer, None)
        self._join(viewer, subscription, present)
        after = self.wanted(viewer)
        return after - before, before - after

    def wanted(self, viewer: Subscriber) -> set[TableId]:
        entry = self._wanted.get(viewer)
        return set(self._tables) if entry is None else set(entry[1])

    def new_table(self, table: TableId) -> None:
        """A table the hub did not know: into the audience of the viewers that want it."""
        for viewer, (subscription, wanted) in self._wanted.items():
            if subscription.wants(table):
                wanted.add(table)
                if viewer not in self._away:
                    self._audience.setdefault(table, set()).add(viewer)

    def _join(
        self, viewer: Subscriber, subscription: Subscription | None, present: bool = True
    ) -> None:
        """Work out the tables it wants (once per subscription), and enter it if present."""
        if subscription is not None and not subscription.everything:
            wanted = {table for table in self._tables if subscription.wants(table)}
            self._wanted[viewer] = (subscription, wanted)
        if present:
            self._enter(viewer)

    def _enter(self, viewer: Subscriber) -> None:
        """Into the fan-out: among the viewers of every table, or in the audience of each
        table it wants (as worked out when it subscribed)."""
        entry = self._wanted.get(viewer)
        if entry is None:
            self._everything.add(viewer)
        else:
            for table in entry[1]:
                self._audience.setdefault(table, set()).add(viewer)

    def _leave(self, viewer: Subscriber) -> None:
        """Out of the fan-out (its subscription is kept)."""
        self._everything.discard(viewer)
        if (entry := self._wanted.get(viewer)) is not None:
            for table in entry[1]:
                audience = self._audience.get(table)
                if audience is not None:
                    audience.discard(viewer)
                    if not audience:
                        del self._audience[table]

    @contextmanager
    def away(self, viewer: Subscriber) -> Iterator[None]:
        """Leave this viewer out of the fan-out while the block runs (its peer is behind).

        On its way back it is offered, at once, what it would then hold: the latest frame of
        each slot that changed meanwhile, in the order they changed. What it skips is counted as
        conflated as it happens (see deliver), as for any viewer. (A no-op for a viewer that is
        not subscribed, or is away already.)
        """
        if viewer not in self.viewers or viewer in self._away:
            yield
            return
        self._leave(viewer)
        self._away.add(viewer)
        mark = self.count
        self._away_marks.append(mark)  # the largest yet: the list stays sorted
        try:
            yield
        finally:
            del self._away_marks[bisect_left(self._away_marks, mark)]
            if viewer in self.viewers:
                self._away.discard(viewer)
                self._enter(viewer)
                self._back(viewer, mark)

    def _back(self, viewer: Subscriber, mark: int) -> None:
        entry = self._wanted.get(viewer)
        changed: list[Frame] = []
        for number, frame in reversed(self._latest.values()):
            if number <= mark:
                break
            if entry is None or frame.table in entry[1]:
                changed.append(frame)
        conflated = 0  # frames still waiting from before it left, replaced now
        for frame in reversed(changed):
            conflated += viewer.offer(frame)
        if conflated:
            self.metrics.conflated.inc(conflated)
