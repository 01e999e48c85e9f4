"""mt5hub.delta: the patch body of protocol v1.1 turns one update into the next, exactly.

The property: for any two updates of a table, `apply(old, diff(old, new))` is `new` as a
JavaScript viewer reads it (the hub's `type`, `seq`, `ts` and `online` aside). The examples
pin down the format docs/protocol.md documents.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from typing import Any

from delta_cases import as_javascript_reads_it, document, mutate, table_of
from hypothesis import given, settings
from hypothesis import strategies as st

from mt5hub.delta import IGNORED, apply, diff
from mt5hub.testing.tables import SignalTable


def update(data: list[dict[str, Any]], seq: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "type": "update",
        "key": "EA1",
        "src": "EURUSD_PERIOD_H1",
        "clientId": "EA1_1",
        "data": data,
        "seq": seq,
        "ts": 1732460000000 + seq,
        **extra,
    }


def row(pair: str, *cells: tuple[str, float], total: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {
        "pair": pair,
        "TF_data": [{tf: v, "cell_color": "clrGreen" if v > 0 else "clrRed"} for tf, v in cells],
        "sum": total,
        "sum_cell_color": "clrGreen",
        **extra,
    }


def round_trip(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The body, after checking that it turns old into new once sent as JSON."""
    before = json.dumps(old)
    body = diff(old, new)
    sent = json.loads(json.dumps(body))
    assert as_javascript_reads_it(table_of(apply(old, sent))) == as_javascript_reads_it(
        table_of(new)
    )
    assert table_of(apply(old, body)) == table_of(new)
    assert json.dumps(old) == before, "apply or diff changed old"
    return body


# -- the property ------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None)
@given(st.randoms(use_true_random=False))
def test_applying_the_patch_of_any_two_updates_gives_the_second(rng: random.Random) -> None:
    old = document(rng)
    new = mutate(rng, old)
    body = round_trip(old, new)
    assert not IGNORED & set(body.get("set", {})) and not IGNORED & set(body.get("unset", []))
    assert diff(new, new) == {}
    # and back, and on from there: a viewer applies patch after patch
    round_trip(new, old)
    round_trip(new, mutate(rng, new))


# -- examples, one behaviour each ---------------------------------------------------------------

TABLE = update([row("EURUSD", ("M1", 1.2), ("H1", -0.4)), row("GBPUSD", ("M1", 3.0), ("H1", 2.0))])


def test_an_unchanged_table_gives_an_empty_patch() -> None:
    assert diff(TABLE, copy.deepcopy(TABLE)) == {}


def test_seq_ts_type_and_online_are_never_in_a_body() -> None:
    new = {**copy.deepcopy(TABLE), "seq": 2, "ts": 1, "online": False, "type": "snapshot"}
    assert round_trip(TABLE, new) == {}


def test_a_changed_cell_is_sent_alone_as_its_value_and_colour() -> None:
    new = copy.deepcopy(TABLE)
    new["data"][1]["TF_data"][1] = {"H1": 2.1, "cell_color": "clrLimeGreen"}
    assert round_trip(TABLE, new) == {"rows": {"GBPUSD": {"cells": {"H1": [2.1, "clrLimeGreen"]}}}}


def test_a_cell_whose_colour_stayed_is_sent_as_its_value_alone() -> None:
    new = copy.deepcopy(TABLE)
    colour = new["data"][1]["TF_data"][1]["cell_color"]
    new["data"][1]["TF_data"][1] = {"H1": 2.5, "cell_color": colour}
    assert round_trip(TABLE, new) == {"rows": {"GBPUSD": {"cells": {"H1": 2.5}}}}


def test_changed_row_fields_are_set_and_removed_ones_unset() -> None:
    old = update([row("EURUSD", ("M1", 1.2), gone="soon", same=[1, 2])])
    new = update(
        [row("EURUSD", ("M1", 1.2), total=-3.5, note=None, tags=["a", {"b": None}], same=[1, 2])]
    )
    assert round_trip(old, new) == {
        "rows": {"EURUSD": {"set": {"sum": -3.5, "note": None, "tags": ["a", {"b": None}]},
                            "unset": ["gone"]}}
    }  # fmt: skip


def test_added_rows_are_sent_whole_with_the_new_order() -> None:
    new = copy.deepcopy(TABLE)
    new["data"].insert(1, row("USDJPY", ("M1", 5.0)))
    assert round_trip(TABLE, new) == {
        "added": [row("USDJPY", ("M1", 5.0))],
        "order": ["EURUSD", "USDJPY", "GBPUSD"],
    }


def test_removed_rows_are_named_and_need_no_order() -> None:
    new = update(TABLE["data"][1:])
    assert round_trip(TABLE, new) == {"removed": ["EURUSD"]}


def test_reordered_rows_send_the_order_alone() -> None:
    new = update(TABLE["data"][::-1])
    assert round_trip(TABLE, new) == {"order": ["GBPUSD", "EURUSD"]}


def test_timeframes_added_removed_and_reordered_are_sent_as_rows_are() -> None:
    old = update([row("EURUSD", ("M1", 1.0), ("M5", 2.0), ("H1", 3.0))])
    new = update([row("EURUSD", ("H1", 3.0), ("M1", 1.0), ("D1", 4.0))])
    assert round_trip(old, new) == {
        "rows": {"EURUSD": {"cells": {"D1": [4.0, "clrGreen"]},
                            "removed": ["M5"], "order": ["H1", "M1", "D1"]}}
    }  # fmt: skip


def test_top_level_fields_are_set_and_unset() -> None:
    old = update(TABLE["data"], sent=1.5, gone=True)
    new = update(TABLE["data"], sent=1.6, extra={"nested": [None]})
    new["clientId"] = "EA1_2"
    assert round_trip(old, new) == {
        "set": {"clientId": "EA1_2", "sent": 1.6, "extra": {"nested": [None]}},
        "unset": ["gone"],
    }


def test_a_pair_given_twice_sends_data_whole() -> None:
    old = update([row("EURUSD", ("M1", 1.0)), row("EURUSD", ("M1", 2.0))])
    new = update([row("EURUSD", ("M1", 1.0)), row("EURUSD", ("M1", 3.0))])
    assert round_trip(old, new) == {"set": {"data": new["data"]}}
    assert round_trip(TABLE, old) == {"set": {"data": old["data"]}}  # repeated in new only


def test_a_timeframe_given_twice_sends_that_rows_cells_whole() -> None:
    old = update([row("EURUSD", ("M1", 1.0), ("M1", 2.0)), row("GBPUSD", ("M1", 1.0))])
    new = update([row("EURUSD", ("M1", 1.0), ("M1", 3.0)), row("GBPUSD", ("M1", 1.0))])
    assert round_trip(old, new) == {
        "rows": {"EURUSD": {"set": {"TF_data": new["data"][0]["TF_data"]}}}
    }


def test_a_boolean_where_a_number_was_is_sent() -> None:
    """Python's `==` says `True == 1`; a viewer in JavaScript would see the difference."""
    old = update(TABLE["data"], flag=1, deep=[{"x": 0.0}])
    new = update(TABLE["data"], flag=True, deep=[{"x": False}])
    assert round_trip(old, new) == {"set": {"flag": True, "deep": [{"x": False}]}}


def test_apply_shares_what_did_not_change() -> None:
    new = copy.deepcopy(TABLE)
    new["data"][1]["sum"] = 9.9
    patched = apply(TABLE, diff(TABLE, new))
    assert patched["data"][0] is TABLE["data"][0]
    assert patched["data"][1]["TF_data"] is TABLE["data"][1]["TF_data"]


def frame(doc: dict[str, Any]) -> int:
    return len(json.dumps(doc, separators=(",", ":")))


def test_a_tenth_of_a_28_by_9_table_changed_makes_a_patch_five_times_smaller() -> None:
    table = SignalTable(random.Random(3), change=0.1)
    docs = [update(table.step(), seq=n, sent=1732460000.0 + n / 10) for n in range(1, 52)]
    docs = [json.loads(json.dumps(doc)) for doc in docs]  # as a viewer or the hub holds them
    full = patches = 0
    for old, new in itertools.pairwise(docs):
        body = round_trip(old, new)
        header = {"type": "patch", "key": new["key"], "src": new["src"], "seq": new["seq"]}
        patches += frame({**header, "base": old["seq"], "ts": new["ts"], **body})
        full += frame(new)
    print(f"full update {full / 50:.0f} B, patch {patches / 50:.0f} B: {full / patches:.1f}x")
    assert full >= 5 * patches
