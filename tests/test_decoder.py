"""The decoder against hostile JSON, no socket needed: every frame the hub must refuse is refused
with its error code and the JSON path or reason in the detail (the same table drives
tests/test_hostile_json.py over a real connection), and the rule on names given twice.
"""

from __future__ import annotations

import json

import pytest
from helpers import (
    publish_frame,
)

from mt5hub.errors import ProtocolError
from mt5hub.models import Decoder, parse_json

# -- JSON the hub refuses or forwards -------------------------------------------------------------

BIG_INT = "1" + "0" * 1000
DEEP = "[" * 100_000 + "]" * 100_000


def _with(text: str, insert: str) -> str:
    """A valid publish with `insert` added as its last top-level member."""
    return text[:-1] + "," + insert + "}"


VALID = publish_frame(key="BAD_JSON", pairs=["EURUSD"])
SUM = '"sum": 12.6'  # VALID's
WIDE = ",".join(f'"x{n}":{n}' for n in range(200))  # past the names models._loads walks one by one
ROWS_100000 = json.dumps(
    {"key": "ROWS", "src": "S", "clientId": "c", "data": [{}] * 100_000}, separators=(",", ":")
)

REFUSED: dict[str, tuple[str, str, str]] = {  # name: (frame, code, in the detail)
    "nested-100000-deep": (DEEP, "bad_json", "nested too deeply"),
    "nested-deep-in-an-extra": (_with(VALID, f'"x":{DEEP}'), "bad_json", "nested too deeply"),
    "1e400-as-sum": (VALID.replace(SUM, '"sum": 1e400'), "bad_schema", "$.data[0].sum"),
    "1001-digit-sum": (VALID.replace(SUM, f'"sum": {BIG_INT}'), "bad_schema", "sum"),
    "5000-digit-integer": (_with(VALID, '"x":' + "9" * 5000), "bad_json", "digits"),
    "nan-sum": (VALID.replace(SUM, '"sum": NaN'), "bad_json", "NaN"),
    "infinity-in-an-extra": (_with(VALID, '"x":Infinity'), "bad_json", "Infinity"),
    "minus-infinity-cell": (VALID.replace('"M1": 1.0', '"M1": -Infinity'), "bad_json", "Infinity"),
    "key-twice": (_with(VALID, '"key":"EA2"'), "bad_json", "$.key: given more than once"),
    "src-twice": (_with(VALID, '"src":"S2"'), "bad_json", "$.src: given more than once"),
    "clientId-twice": (_with(VALID, '"clientId":"c2"'), "bad_json", "$.clientId: given more"),
    "data-twice": (_with(VALID, '"data":[]'), "bad_json", "$.data: given more than once"),
    "type-twice": ('{"type":"ping","type":"publish"}', "bad_json", "$.type: given more"),
    "extra-twice": (_with(_with(VALID, '"x":1'), '"x":2'), "bad_json", "$.x: given more"),
    "key-twice-one-escaped": (_with(VALID, '"k\\u0065y":"EA2"'), "bad_json", "$.key: given"),
    "key-twice-among-200-names": (_with(VALID, WIDE + ',"key":"EA2"'), "bad_json", "$.key: given"),
    "bell-in-key-escaped": (VALID.replace('"BAD_JSON"', '"EA\\u0007"'), "bad_schema", "$.key:"),
    "del-in-src": (VALID.replace('"EURUSD_PERIOD_H1"', '"S\x7f"'), "bad_schema", "$.src:"),
    "c1-control-in-pair": (VALID.replace('"EURUSD",', '"EUR\u0085USD",'), "bad_schema", "pair"),
    "csi-in-pair": (VALID.replace('"EURUSD",', '"\u009b31mEURUSD",'), "bad_schema", "pair"),
    "raw-bell-in-key": (VALID.replace('"BAD_JSON"', '"EA\x07"'), "bad_json", "control character"),
    "raw-newline-in-pair": (VALID.replace('"EURUSD",', '"EUR\nUSD",'), "bad_json", "control"),
    "100000-rows-under-the-frame-limit": (
        ROWS_100000,
        "bad_schema",
        "$.data: at most 500 rows, got 100000",
    ),
}


def test_the_refused_frames_are_what_they_claim() -> None:
    """Each case differs from a valid publish only in what it is about."""
    assert SUM in VALID and parse_json(VALID)["data"][0]["sum"] == 12.6
    assert json.loads(VALID)["data"][0]["TF_data"][0] == {"M1": 1.0, "cell_color": "clrGreen"}
    for name, (text, _, _) in REFUSED.items():
        assert text != VALID, name
        assert len(text.encode()) < 1024 * 1024, name  # under the frame limit: the hub decides
    assert len(json.loads(ROWS_100000)["data"]) == 100_000


@pytest.mark.parametrize("extra", [0, 200], ids=["narrow", "wide"])
@pytest.mark.parametrize("position", ["first", "last"])
def test_a_name_given_twice_is_refused_at_the_top_level_only(extra: int, position: str) -> None:
    """The decoder's rule, on both of its paths (a few top-level names, or many)."""
    names = [f"x{n}" for n in range(extra)]
    wide = "".join(f'"{name}":0,' for name in names)
    nested = '"nested":{"key":1,"key":2},'  # nested: the last one counts, as in browsers
    twice = '"src":"A",' if position == "first" else ""
    text = "{" + twice + wide + nested + '"src":"B"' + ("" if twice else ',"src":"C"') + "}"
    with pytest.raises(ProtocolError) as refused:
        parse_json(text)
    assert (refused.value.code, refused.value.detail) == ("bad_json", "$.src: given more than once")
    ok = parse_json("{" + wide + nested + '"src":"B"}')
    assert ok["nested"] == {"key": 2} and ok["src"] == "B" and len(ok) == extra + 2


DECODER = Decoder(max_rows=500)  # the shared hub's in tests/test_hostile_json.py


@pytest.mark.parametrize("name", REFUSED)
def test_the_decoder_refuses_each_frame_with_its_code_and_what_is_wrong(name: str) -> None:
    """What the hub's error frame says, decided without a socket: PublisherSession parses the
    frame, then the decoder validates the publish."""
    text, code, detail = REFUSED[name]
    with pytest.raises(ProtocolError) as refused:
        DECODER.accept(parse_json(text))
    assert refused.value.code == code, refused.value
    assert detail in refused.value.detail, refused.value
