"""Protocol v1.1 deltas: the patch body that turns a table's previous update into its next one.

Pure (no trio, no I/O). The hub diffs a table's previous update and its new one once per update
and sends the same body to every viewer that asked for deltas (`/ws?delta=1`); a viewer holding
the previous state applies it. `templates/static/patch.js` is `apply` for the browser: keep the
two in step. docs/protocol.md ("Protocol v1.1: deltas") has the format with an example.

A body (every key optional; an unchanged table gives `{}`)::

    set:     {name: value}      top-level fields changed or added (`clientId`, extra fields)
    unset:   [name]             top-level fields removed
    rows:    {pair: rowpatch}   rows that changed
    added:   [row]              rows that are new, whole
    removed: [pair]             rows that are gone
    order:   [pair]             every pair, in the new order; sent only when that is not the old
                                order without the removed pairs (so always when rows were added)

A rowpatch has the same shape one level down::

    set / unset                 the row's fields besides `pair` and `TF_data` (`sum`, extras)
    cells:   {tf: value}        cells whose value changed and colour did not: the new value
             {tf: [value, colour]}  cells new, or whose colour changed: `{tf: value,
                                "cell_color": colour}` (a cell is exactly those two names)
    removed: [tf]               cells that are gone
    order:   [tf]               every timeframe, in the new order; same rule as rows' `order`

Rows are told apart by `pair`, cells by their timeframe (a cell's one name besides
`cell_color`). When that does not tell them apart (a `pair` or a timeframe given twice, a row or
cell of another shape), the list is sent whole as an ordinary field: `set: {"data": [...]}` or,
in a rowpatch, `set: {"TF_data": [...]}`. `type`, `seq`, `ts` and `online` are never in a body:
the patch's header carries `seq` and `ts`, and `online` is not part of the table.

Values are compared as JavaScript reads JSON: numbers by value (`1` and `1.0` are one number, so
are `0.0` and `-0.0`), but `true` is not `1`. So a viewer holds what a full update would have given
it. Documents are updates of publishes the hub accepted (docs/protocol.md): cell values are
numbers, never booleans, and cells are compared with `==` alone, which is most of a diff's cost.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import repeat
from typing import Any, cast

__all__ = ["HEADER", "IGNORED", "apply", "diff"]

IGNORED = frozenset({"type", "seq", "ts", "online"})
"""Fields of an update that are not the table's, never diffed (`apply` keeps old's)."""

HEADER = frozenset({"type", "key", "src", "seq", "base", "ts"})
"""A patch frame's header: `{"type": "patch", "key", "src", "seq", "base", "ts", **body}`. No body
has these names at its top level, so a frame's body is its other fields."""

_TOP_SKIP = IGNORED | {"data"}
_ROW_SKIP = frozenset({"pair", "TF_data"})
_COLOR = "cell_color"
_DICT, _STR, _TWO = frozenset({dict}), frozenset({str}), frozenset({2})
_PAIR_ONLY = frozenset({"pair"})

Json = Any
Doc = dict[str, Json]


def diff(old: Doc, new: Doc) -> Doc:
    """The body that turns update document `old` into `new` (parsed update frames of one table).

    The body shares values with `new`: treat both as read-only while the body is in use.
    """
    body: Doc = {}
    rows = _list_patch(old.get("data"), new.get("data"), _pairs, _row_patch)
    if rows is None:
        _fields(old, new, IGNORED, body)  # `data` whole, if it changed
    else:
        _fields(old, new, _TOP_SKIP, body)
        changed, added, removed, order = rows
        if changed:
            body["rows"] = changed
        if added:
            body["added"] = added
        _order(body, removed, order)
    return body


def apply(old: Doc, body: Doc) -> Doc:
    """The document `body` (made by `diff(old, new)`) turns `old` into: equal to `new` but for
    `type`, `seq`, `ts` and `online`, which are old's (the caller takes `seq` and `ts` from the
    patch's header).

    `old` is not changed; what did not change is shared between old and the result, and values
    from `body` are put in as they are: treat documents as read-only.
    """
    new = _set_fields(old, body)
    if "rows" in body or "added" in body or "removed" in body or "order" in body:
        rows: list[Doc] = old["data"]
        by_pair = {row["pair"]: row for row in rows}
        for pair, rowpatch in body.get("rows", {}).items():
            by_pair[pair] = _apply_row(by_pair[pair], rowpatch)
        for row in body.get("added", ()):
            by_pair[row["pair"]] = row
        new["data"] = _reorder(by_pair, [row["pair"] for row in rows], body)
    return new


# -- diff ---------------------------------------------------------------------------------------


def _same(a: Json, b: Json) -> bool:
    """Equal as JSON values are to JavaScript: numbers by value (`1`, `1.0` are one number, as are
    `0.0` and `-0.0`), but `true` is not `1` (which Python's `==` alone would say)."""
    return bool(a == b) and _bools_agree(a, b)


def _bools_agree(a: Json, b: Json) -> bool:
    """For `a == b`: whether each boolean in one is a boolean in the other."""
    kind = type(a)
    if kind is dict:
        return all(_bools_agree(value, b[name]) for name, value in a.items())
    if kind is list:
        return all(map(_bools_agree, a, b))
    return (kind is bool) == (type(b) is bool)


def _fields(old: Doc, new: Doc, skip: frozenset[str], body: Doc) -> None:
    """Put fields (but `skip`) changed or added in `body["set"]`, removed ones in `unset`."""
    changed = {
        name: value
        for name, value in new.items()
        if name not in skip and (name not in old or not _same(old[name], value))
    }
    if changed:
        body["set"] = changed
    gone = [name for name in old if name not in skip and name not in new]
    if gone:
        body["unset"] = gone


def _pairs(rows: list[Json]) -> list[str] | None:
    """Each row's `pair`, or None when a row is not an object with a string `pair`."""
    if not set(map(type, rows)) <= _DICT:
        return None
    pairs = [row.get("pair") for row in rows]
    return pairs if set(map(type, pairs)) <= _STR else None


def _tfs(cells: list[Json]) -> list[str] | None:
    """Each cell's timeframe (its one name besides `cell_color`), or None when a cell is not
    `{tf: value, "cell_color": colour}`.

    Builtins only, no Python call per cell: this is most of a diff's cost.
    """
    if not (
        set(map(type, cells)) <= _DICT
        and set(map(len, cells)) <= _TWO
        and all(map(operator.contains, cells, repeat(_COLOR)))
    ):
        return None
    firsts: list[str] = list(map(next, map(iter, cells)))  # the timeframe comes first, usually
    if _COLOR not in firsts:
        return firsts
    return [next(name for name in cell if name != _COLOR) for cell in cells]


_ListPatch = tuple[dict[str, Json], list[Json], list[str], list[str] | None]


def _list_patch(
    old: Json,
    new: Json,
    names_of: Callable[[list[Json]], list[str] | None],
    item_patch: Callable[[Json, Json], Json] | None,
) -> _ListPatch | None:
    """(changed, added, removed, new order or None) of two lists of named items; None when the
    names do not tell the items apart. `item_patch(a, b)` is falsy for items that are the same;
    without it, an item that is not `==` is sent whole."""
    if type(old) is not list or type(new) is not list:
        return None
    old_names, new_names = names_of(old), names_of(new)
    if old_names is None or new_names is None:
        return None
    if old_names == new_names and item_patch is None:  # the common case, kept short
        if len(set(new_names)) != len(new):
            return None
        same = zip(new_names, old, new, strict=True)
        return {name: b for name, a, b in same if a != b}, [], [], None
    held = dict(zip(old_names, old, strict=True))
    names = set(new_names)
    if len(held) != len(old) or len(names) != len(new):
        return None
    changed: dict[str, Json] = {}
    added: list[Json] = []
    for name, item in zip(new_names, new, strict=True):
        if name in held:
            was = held[name]
            if item_patch is None:
                if was != item:
                    changed[name] = item
            else:
                patch = item_patch(was, item)
                if patch:
                    changed[name] = patch
        else:
            added.append(item)
    kept = [name for name in old_names if name in names]
    removed = [name for name in old_names if name not in names] if len(kept) < len(old) else []
    return changed, added, removed, None if kept == new_names else new_names


def _order(body: Doc, removed: list[str], order: list[str] | None) -> None:
    if removed:
        body["removed"] = removed
    if order is not None:
        body["order"] = order


def _row_patch(old: Doc, new: Doc) -> Doc:
    """The rowpatch from row `old` to row `new` (same `pair`); `{}` when they are the same."""
    if old == new and all(
        name == "TF_data" or _bools_agree(value, new[name]) for name, value in old.items()
    ):  # `==` alone for cells, the hot path: the hub let only numbers and strings in there
        return {}
    patch: Doc = {}
    cells = _list_patch(old.get("TF_data"), new.get("TF_data"), _tfs, None)  # cells sent whole
    if cells is None:
        _fields(old, new, _PAIR_ONLY, patch)  # `TF_data` whole, if it changed
        return patch
    _fields(old, new, _ROW_SKIP, patch)
    changed, added, removed, order = cells
    if changed or added:
        held = dict(zip(cast(list[str], _tfs(old["TF_data"])), old["TF_data"], strict=True))
        compact = {tf: _cell_patch(tf, cell, held[tf]) for tf, cell in changed.items()}
        for tf, cell in zip(cast(list[str], _tfs(added)), added, strict=True):
            compact[tf] = [cell[tf], cell[_COLOR]]
        patch["cells"] = compact
    _order(patch, removed, order)
    return patch


def _cell_patch(tf: str, cell: Doc, was: Doc) -> Json:
    """A changed cell: its value alone when only that changed (a number), else value and colour."""
    value, colour = cell[tf], cell[_COLOR]
    if type(value) in (int, float) and _same(colour, was[_COLOR]):
        return value
    return [value, colour]


# -- apply --------------------------------------------------------------------------------------


def _set_fields(old: Doc, patch: Doc) -> Doc:
    unset = patch.get("unset")
    new = {name: value for name, value in old.items() if name not in unset} if unset else dict(old)
    new.update(patch.get("set", ()))
    return new


def _apply_row(row: Doc, patch: Doc) -> Doc:
    new = _set_fields(row, patch)
    if "cells" in patch or "removed" in patch or "order" in patch:
        cells: list[Doc] = row["TF_data"]
        names = cast(list[str], _tfs(cells))
        by_tf = dict(zip(names, cells, strict=True))
        for tf, change in patch.get("cells", {}).items():
            if type(change) is list:
                by_tf[tf] = {tf: change[0], _COLOR: change[1]}
            else:
                by_tf[tf] = {tf: change, _COLOR: by_tf[tf][_COLOR]}
        new["TF_data"] = _reorder(by_tf, names, patch)
    return new


def _reorder(by_name: dict[Any, Doc], old_names: list[Any], patch: Doc) -> list[Doc]:
    """The items in the patch's `order`, or else in the old order without the removed ones."""
    order = patch.get("order")
    if order is None:
        removed = set(patch.get("removed", ()))
        order = [name for name in old_names if name not in removed] if removed else old_names
    return [by_name[name] for name in order]
