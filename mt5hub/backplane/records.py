"""The records hubs exchange on the backplane's channel: one format, for Lua and for Python.

A channel message is one or more records, so that a batch costs one PUBLISH and one message to
every hub:

    update:   "U\\n<seq>\\n<wall time>\\n<origin>\\n<table>\\n<bytes>\\n<text>"
    presence: "P\\n<1|0>\\n<table>\\n<clientId>\\n"

Tables are JSON (`["key","src"]`) and clientIds carry no control characters, so neither holds a
newline; an update's text is counted in bytes. lua/lib_records.lua writes them in Redis; this
module writes the same (for tests) and reads them. tests/test_backplane_redis.py holds both
sides to it on a real Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import attrs

from ..state import encode
from ..subscription import TableId


def table_field(table: TableId) -> str:
    """A table's name in Redis hashes and records: `["key","src"]` (no raw newlines in it)."""
    return encode(list(table))


def parse_table(field: str) -> TableId:
    key, src = json.loads(field)
    return (str(key), str(src))


@attrs.frozen
class UpdateRecord:
    seq: int
    wall: float  # the publish's arrival, wall clock of the hub that accepted it
    origin: str  # "<worker>#<serial>" of that hub, "" for a state offered after an outage
    table: TableId
    text: str  # the update viewers get, but for its seq


@attrs.frozen
class PresenceRecord:
    online: bool
    table: TableId
    client_id: str


Record = UpdateRecord | PresenceRecord


def update_record(seq: int, wall: float | str, origin: str, table: TableId, text: str) -> bytes:
    body = text.encode()
    return f"U\n{seq}\n{wall}\n{origin}\n{table_field(table)}\n{len(body)}\n".encode() + body


def presence_record(online: bool, table: TableId, client_id: str) -> bytes:
    return f"P\n{int(online)}\n{table_field(table)}\n{client_id}\n".encode()


def parse_records(data: bytes) -> Iterator[Record]:
    """The records of one channel message, in order; ValueError on anything else."""
    pos = 0

    def line() -> str:
        nonlocal pos
        end = data.index(b"\n", pos)
        text, pos = data[pos:end].decode(), end + 1
        return text

    while pos < len(data):
        kind = line()
        if kind == "U":
            seq, wall, origin, field, size = line(), line(), line(), line(), int(line())
            if pos + size > len(data):
                raise ValueError("backplane: an update record cut short")
            text, pos = data[pos : pos + size].decode(), pos + size
            yield UpdateRecord(int(seq), float(wall), origin, parse_table(field), text)
        elif kind == "P":
            online, field, client_id = line(), line(), line()
            yield PresenceRecord(online == "1", parse_table(field), client_id)
        else:
            raise ValueError(f"backplane: unknown record {kind!r}")
