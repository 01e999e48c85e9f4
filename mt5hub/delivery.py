"""What one viewer is sent (protocol v1.1): its subscription, and what its peer holds.

A viewer of every table that does not ask for patches is sent every frame as it is; nothing here
runs for it. Any other viewer has a `Delivery`, which its session asks before each write: an
update goes out as a patch when the peer holds the update before it (mt5hub.patches); an update
the peer holds already, or of a table it has left since the frame was queued, is dropped; a
partial snapshot older than what goes out before it is made again, so the peer never steps back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import ProtocolError
from .fanout import Frame, Subscriber
from .hub import Hub
from .patches import patch_for
from .publisher import RateLimiter
from .state import encode
from .subscription import Subscription, TableId, message_selectors

# Subscription changes a viewer may make (each is work over every table): per second, at once
CHANGE_RATE, CHANGE_BURST = 10.0, 20


def forbidden(keys: Sequence[str]) -> ProtocolError:
    return ProtocolError("forbidden_key", "this viewer's token does not grant these keys",
                         keys=list(keys))  # fmt: skip


class Delivery:
    """A viewer's subscription, whether it takes patches, and the seq of each table its peer
    holds once what was written reaches it."""

    def __init__(self, hub: Hub, subscription: Subscription, delta: bool, flood_seconds: float):
        self.hub, self.subscription, self.delta = hub, subscription, delta
        self.held: dict[TableId, int] = {}
        self._changes = RateLimiter(CHANGE_RATE, CHANGE_BURST, flood_seconds)

    def change(self, viewer: Subscriber, request: dict[str, Any]) -> Frame:
        """A `subscribe` or `unsubscribe` from the peer: the frame that acknowledges it (the
        partial snapshot of the tables it now gets, or the tables it no longer gets)."""
        if not self._changes.allow():
            raise ProtocolError("rate_limited", f"at most {CHANGE_RATE:g} subscription changes "
                                f"a second (bursts of {CHANGE_BURST})")  # fmt: skip
        subscribe = request["type"] == "subscribe"
        chosen = message_selectors(request)
        if subscribe and (beyond := self.subscription.forbidden(chosen)):
            raise forbidden(beyond)
        self.subscription.change(subscribe, chosen)
        snapshot, removed = self.hub.resubscribe(viewer, self.subscription)
        for table in removed:
            self.held.pop(table, None)
        if subscribe:
            return snapshot  # even if it holds no table
        tables = [{"key": key, "src": src} for key, src in removed]
        return Frame(encode({"type": "unsubscribed", "tables": tables}))

    def prepare(self, frames: Sequence[Frame]) -> tuple[list[Frame], dict[TableId, int]]:
        """What to write for these frames, and what the peer then holds (for `held`, once the
        write is under way)."""
        subscription = self.subscription
        held, wants = self.held, None if subscription.everything else subscription.wants
        after: dict[TableId, int] = {}
        out: list[Frame] = []
        for frame in frames:
            table = frame.table
            if frame.seqs is not None:  # a snapshot
                if frame.partial and any(
                    after.get(t, held.get(t, 0)) > seq for t, seq in frame.seqs.items()
                ):
                    frame = self.hub.snapshots.of(frame.seqs, partial=True)
                assert frame.seqs is not None
                after.update(frame.seqs)
            elif table is not None:
                if wants is not None and not wants(table):
                    continue  # queued before the peer unsubscribed
                if frame.seq:  # an update
                    had = after.get(table, held.get(table))
                    if had is not None and had >= frame.seq:
                        continue
                    after[table] = frame.seq
                    if self.delta and had == frame.base and (patch := patch_for(frame)):
                        frame = patch
            out.append(frame)
        return out, after
