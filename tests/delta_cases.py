"""Random update documents and the changes one update makes to the next, for the delta tests.

Driven by a `random.Random`: hypothesis hands one in (`st.randoms()`) for the property test, and
the browser test seeds its own, so both see the same kinds of cases. Names are drawn from small
pools so that old and new share rows and timeframes, repeat them now and then, and include the
awkward ones: `__proto__` and names JavaScript orders as array indexes (`"1"`, `"10"`).
"""

from __future__ import annotations

import copy
import random
from typing import Any

PAIRS = ("EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "NZDUSD", "1", "10", "__proto__", "constructor")
TFS = ("M1", "M5", "M15", "H1", "H4", "D1", "W1", "1", "10", "__proto__")
COLOURS = ("clrGreen", "clrRed", "clrGray", "clrLimeGreen", "")
NAMES = ("note", "sent", "meta", "1", "__proto__", "tags", "x")  # extra fields, top level and rows
NUMBERS = (0, 1, -1, 0.0, -0.0, 1.0, 0.5, -12.3, 99.9, 1e-7, 2**40)


def value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value: null, booleans, numbers (1 next to 1.0, 0 next to -0.0), text, nesting."""
    kind = rng.randrange(8 if depth < 2 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(NUMBERS)
    if kind == 3:
        return rng.choice(("", "a", "é ✓", '"quoted"', "1"))
    if kind == 4:
        return round(rng.uniform(-100, 100), rng.randrange(3))
    if kind in (5, 6):
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(NAMES): value(rng, depth + 1) for _ in range(rng.randrange(4))}


def cell(rng: random.Random, tf: str) -> dict[str, Any]:
    number = rng.choice(NUMBERS) if rng.random() < 0.3 else round(rng.uniform(-100, 100), 1)
    if rng.random() < 0.5:
        return {tf: number, "cell_color": rng.choice(COLOURS)}
    return {"cell_color": rng.choice(COLOURS), tf: number}  # the colour first


def names(rng: random.Random, pool: tuple[str, ...], most: int) -> list[str]:
    """Distinct names from the pool, or now and then one of them twice."""
    chosen = rng.sample(pool, rng.randrange(min(most, len(pool)) + 1))
    if chosen and rng.random() < 0.1:
        chosen.insert(rng.randrange(len(chosen) + 1), rng.choice(chosen))
    return chosen


def row(rng: random.Random, pair: str) -> dict[str, Any]:
    result: dict[str, Any] = {
        "pair": pair,
        "TF_data": [cell(rng, tf) for tf in names(rng, TFS, 6)],
        "sum": round(rng.uniform(-100, 100), 1),
        "sum_cell_color": rng.choice(COLOURS),
    }
    for _ in range(rng.randrange(3) if rng.random() < 0.3 else 0):
        result[rng.choice(NAMES)] = value(rng)
    return result


def document(rng: random.Random) -> dict[str, Any]:
    """An update as a viewer gets it: the publish's fields and the hub's."""
    doc: dict[str, Any] = {
        "type": "update",
        "key": "EA1",
        "src": "EURUSD_PERIOD_H1",
        "clientId": rng.choice(("EA1_1", "EA1_2")),
        "data": [row(rng, pair) for pair in names(rng, PAIRS, 7)],
        "seq": rng.randrange(1, 100),
        "ts": 1732460000000 + rng.randrange(10**6),
    }
    if rng.random() < 0.3:
        doc["online"] = rng.random() < 0.5
    for _ in range(rng.randrange(3)):
        doc[rng.choice(NAMES)] = value(rng)
    return doc


def mutate(rng: random.Random, old: dict[str, Any]) -> dict[str, Any]:
    """The next update: a few random changes to a copy of `old` (or, now and then, another
    table altogether)."""
    if rng.random() < 0.05:
        return document(rng)
    new = copy.deepcopy(old)
    new["seq"] = old["seq"] + 1
    new["ts"] = old["ts"] + rng.randrange(1, 1000)
    if rng.random() < 0.3:
        new["online"] = rng.random() < 0.5
    for _ in range(rng.randrange(6)):
        CHANGES[rng.randrange(len(CHANGES))](rng, new)
    return new


def _a_row(rng: random.Random, doc: dict[str, Any]) -> dict[str, Any] | None:
    rows = doc["data"]
    return rng.choice(rows) if rows else None


def change_cell(rng: random.Random, doc: dict[str, Any]) -> None:
    target = _a_row(rng, doc)
    if target and target["TF_data"]:
        at = rng.randrange(len(target["TF_data"]))
        old = target["TF_data"][at]
        tf = next(name for name in old if name != "cell_color")
        target["TF_data"][at] = cell(rng, tf)


def change_row_field(rng: random.Random, doc: dict[str, Any]) -> None:
    target = _a_row(rng, doc)
    if target is None:
        return
    what = rng.randrange(4)
    if what == 0:
        target["sum"] = rng.choice(NUMBERS)
    elif what == 1:
        target["sum_cell_color"] = rng.choice(COLOURS)
    elif what == 2:
        target[rng.choice(NAMES)] = value(rng)
    else:
        target.pop(rng.choice(NAMES), None)


def add_row(rng: random.Random, doc: dict[str, Any]) -> None:
    doc["data"].insert(rng.randrange(len(doc["data"]) + 1), row(rng, rng.choice(PAIRS)))


def remove_row(rng: random.Random, doc: dict[str, Any]) -> None:
    if doc["data"]:
        del doc["data"][rng.randrange(len(doc["data"]))]


def reorder_rows(rng: random.Random, doc: dict[str, Any]) -> None:
    rng.shuffle(doc["data"])


def change_cells(rng: random.Random, doc: dict[str, Any]) -> None:
    """Add, remove, repeat or reorder one row's timeframes."""
    target = _a_row(rng, doc)
    if target is None:
        return
    cells = target["TF_data"]
    what = rng.randrange(4)
    if what == 0:
        cells.insert(rng.randrange(len(cells) + 1), cell(rng, rng.choice(TFS)))
    elif what == 1 and cells:
        del cells[rng.randrange(len(cells))]
    elif what == 2 and cells:
        cells.append(copy.deepcopy(rng.choice(cells)))
    else:
        rng.shuffle(cells)


def change_top(rng: random.Random, doc: dict[str, Any]) -> None:
    what = rng.randrange(3)
    if what == 0:
        doc["clientId"] = rng.choice(("EA1_1", "EA1_2", "EA1_3"))
    elif what == 1:
        doc[rng.choice(NAMES)] = value(rng)
    else:
        doc.pop(rng.choice(NAMES), None)


def booleans_for_numbers(rng: random.Random, doc: dict[str, Any]) -> None:
    """`true` where `1` was (Python's `==` calls them equal; JavaScript does not)."""
    for holder in [doc, *doc["data"]]:
        for name in NAMES:
            if name in holder and holder[name] in (0, 1) and rng.random() < 0.7:
                holder[name] = (
                    not holder[name] if type(holder[name]) is bool else bool(holder[name])
                )


CHANGES = (
    change_cell,
    change_cell,
    change_cell,
    change_row_field,
    add_row,
    remove_row,
    reorder_rows,
    change_cells,
    change_top,
    booleans_for_numbers,
)


def as_javascript_reads_it(doc: Any) -> Any:
    """A document as JavaScript holds it: numbers by value (1 is 1.0, -0.0 is 0), but `true`
    is not 1. What `apply(old, diff(old, new))` must equal `new` in."""
    kind = type(doc)
    if kind is bool:
        return ("bool", doc)
    if kind is int or kind is float:
        return float(doc)
    if kind is dict:
        return {name: as_javascript_reads_it(v) for name, v in doc.items()}
    if kind is list:
        return [as_javascript_reads_it(v) for v in doc]
    return doc


def table_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without the hub's per-update fields, which no patch body carries."""
    return {name: v for name, v in doc.items() if name not in ("type", "seq", "ts", "online")}
