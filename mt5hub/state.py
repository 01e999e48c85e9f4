"""What the hub holds: each table's latest state, within the capacity configured, and the
snapshots new viewers get of it.

A table's latest update is kept as the frame viewers got (its text, `seq` included), so a
snapshot is made by joining texts, not by encoding anything again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from .errors import OverLimit, ProtocolError
from .fanout import Fanout, Frame
from .subscription import TableId

RESERVED = frozenset({"type", "seq", "ts", "online"})  # set by the hub, never by a publisher
# A snapshot at least this large is handed to new viewers again for up to SNAPSHOT_REUSE seconds
# after the state changed, with the frames that changed since; a smaller one is made anew.
SNAPSHOT_REUSE_BYTES = 64 * 1024
SNAPSHOT_REUSE = 0.5


def encode(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class Publisher(Protocol):
    """A live publisher connection, as the hub sees it (a session, or a test's stand-in)."""

    def superseded(self, client_id: str) -> None:
        """A newer connection of this clientId took over this one's tables: end this one."""


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


class Snapshots:
    """The snapshots new viewers get: the latest state of the tables each one is sent.

    The snapshot of every table is made once per change and shared by every viewer of every
    table (its WebSocket frame, plain or compressed, is made once too: see mt5hub.server). A
    large one is shared for SNAPSHOT_REUSE after a change as well: the viewer then gets what
    changed since with it (`Fanout.subscribed`), so that a crowd of viewers connecting while
    tables change costs a few snapshots, not one each. A viewer of some tables gets its own.
    """

    def __init__(
        self, tables: dict[TableId, TableState], fanout: Fanout, now_ms: Callable[[], int]
    ) -> None:
        self._tables, self._fanout, self._now_ms = tables, fanout, now_ms
        self._shared: tuple[Frame, int, float] | None = None  # frame, fan-out count, made at

    def everything(self) -> tuple[Frame, int]:
        """Every table's latest state in one frame, and the fan-out's count it reflects."""
        count, now = self._fanout.count, time.monotonic()
        if self._shared is not None:
            frame, made_at_count, made_at = self._shared
            if made_at_count == count or (
                len(frame.text) >= SNAPSHOT_REUSE_BYTES and now - made_at < SNAPSHOT_REUSE
            ):
                return frame, made_at_count
        frame = self.of(self._tables)
        self._shared = (frame, count, now)
        return frame, count

    def of(self, tables: Iterable[TableId], partial: bool = False) -> Frame:
        """These tables' latest state (those with an update) in one frame, with their seqs.

        `partial`: sent to a viewer that subscribed to more tables; it adds to what it holds.
        """
        states = [s for t in tables if (s := self._tables.get(t)) is not None and s.update]
        entries = ",".join(s.snapshot_entry() for s in states)
        head = '"type":"snapshot","partial":true' if partial else '"type":"snapshot"'
        text = f'{{{head},"ts":{self._now_ms()},"tables":[{entries}]}}'
        return Frame(text, seqs={s.table: s.seq for s in states}, partial=partial)

    def changed(self) -> None:
        """Tables were put back from elsewhere (a restart): the shared snapshot is stale."""
        self._shared = None
