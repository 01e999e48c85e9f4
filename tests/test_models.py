"""Property tests of the publish decoder (mt5hub.models): whatever a publisher sends, the decoder
answers with a Publish or a ProtocolError, never anything else.

Hypothesis runs derandomized (the same examples on every run), so CI sees no surprise failures;
a failure it finds is a real bug and is printed with the smallest input that shows it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mt5hub.errors import ProtocolError
from mt5hub.models import Cell, Decoder, Publish, Row, looks_valid, parse_json

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_ROWS = 8
DECODER = Decoder(MAX_ROWS)
WIRE_FIELDS = frozenset({"key", "src", "clientId", "data"})
ROW_FIELDS = frozenset({"pair", "TF_data", "sum", "sum_cell_color"})

# -- strategies ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: huge integers must be refused, not crash the decoder
    | st.floats()  # NaN and ±Infinity too: json.dumps writes them, parse_json must refuse them
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
finite_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=15,
)

# Text a person may use in a name: anything but control characters (and lone surrogates,
# which are no text at all).
readable = st.characters(exclude_categories=["Cc", "Cs"])


def names(max_size: int) -> st.SearchStrategy[str]:
    return st.text(readable, min_size=1, max_size=max_size)


colors = st.text(readable, max_size=64)
finite_numbers = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)
tf_names = st.from_regex(r"[A-Za-z0-9_]{1,16}", fullmatch=True).filter(lambda n: n != "cell_color")
cells = st.builds(
    lambda tf, value, color: {tf: value, "cell_color": color}, tf_names, finite_numbers, colors
)
extras = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in WIRE_FIELDS | ROW_FIELDS),
    finite_json_values,
    max_size=3,
)
rows = st.builds(
    lambda pair, tf_data, total, color, extra: {
        **extra,
        "pair": pair,
        "TF_data": tf_data,
        "sum": total,
        "sum_cell_color": color,
    },
    names(64),
    st.lists(cells, max_size=32),
    finite_numbers,
    colors,
    extras,
)
valid_publishes = st.builds(
    lambda key, src, client_id, data, extra: {
        **extra,
        "key": key,
        "src": src,
        "clientId": client_id,
        "data": data,
    },
    names(128),
    names(128),
    names(128),
    st.lists(rows, max_size=MAX_ROWS),
    extras,
)


def containers(value: Any) -> list[dict[str, Any] | list[Any]]:
    """Every object and array in a JSON value, outermost first."""
    found: list[dict[str, Any] | list[Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            found.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


# Wrong or missing values, and names the decoder treats specially.
odd_values = json_values | st.sampled_from(
    ["", "x" * 65, "x" * 129, "M 1", "cell_color", "\x07", 1e308, -0.0, 2**64, True, [], {}]
)


@st.composite
def mangled_publishes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid publish with up to four values replaced, deleted or added anywhere in it.

    Arbitrary JSON seldom looks like a publish; these reach every path of the decoder, and the
    ones left intact (no change drawn) must decode.
    """
    message: dict[str, Any] = draw(valid_publishes)
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from(containers(message)))
        if isinstance(target, dict):
            keys = [*sorted(target), "M1", "cell_color", "sum", "pair", "TF_data", "data"]
            key = draw(st.sampled_from(keys))
            if key in target and draw(st.booleans()):
                del target[key]
            else:
                target[key] = copy.deepcopy(draw(odd_values))
        elif target and draw(st.booleans()):
            target[draw(st.integers(0, len(target) - 1))] = copy.deepcopy(draw(odd_values))
        else:
            # Copies: `sampled_from` hands out its own `[]` and `{}`, which must stay empty.
            target.extend(copy.deepcopy(draw(st.lists(odd_values, max_size=MAX_ROWS + 1))))
    return message


def non_finite(value: Any) -> bool:
    """Whether json.dumps writes NaN or Infinity somewhere in this value (JSON has neither)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(map(non_finite, value))
    if isinstance(value, dict):
        return any(map(non_finite, value.values()))
    return False


def decode(text: str | bytes) -> Publish:
    return DECODER.publish(parse_json(text))


def assert_protocol_error(error: ProtocolError) -> None:
    assert error.code in {"bad_json", "bad_schema"}
    assert isinstance(error.detail, str) and error.detail
    if error.code == "bad_schema":
        assert error.detail.startswith("$"), error.detail  # names the wire path


# -- (a) any JSON value: a Publish or a ProtocolError -----------------------------------------


@PROPERTY
@given(json_values | mangled_publishes())
def test_any_json_value_decodes_to_a_publish_or_a_protocol_error(value: Any) -> None:
    text = json.dumps(value)  # NaN and Infinity come out as the bare words, which JSON forbids
    try:
        publish = decode(text)
    except ProtocolError as error:
        assert_protocol_error(error)
        if error.code == "bad_json":  # only for what JSON (or Python's int parser) forbids
            assert non_finite(value) or re.search(r"\d{4301}", text), error.detail
    else:
        assert isinstance(publish, Publish)
        assert isinstance(value, dict) and value.keys() >= WIRE_FIELDS


@PROPERTY
@given(json_values)
def test_parse_json_returns_exactly_the_json_value_that_was_sent(value: Any) -> None:
    text = json.dumps(value)
    if non_finite(value):
        with pytest.raises(ProtocolError) as refused:
            parse_json(text)
        assert refused.value.code == "bad_json"
    else:
        assert parse_json(text) == value


# -- (b) any text or bytes at all: parse_json answers or raises ProtocolError ------------------

json_alphabet = st.text(st.sampled_from(list('{}[]",:0123456789.eE+-truefalsnNaIiy\\u d8')))


@PROPERTY
@given(st.text() | json_alphabet)
def test_any_text_parses_or_raises_bad_json_and_what_it_accepts_can_be_sent_as_utf8(
    text: str,
) -> None:
    try:
        value = parse_json(text)
    except ProtocolError as error:
        assert error.code == "bad_json" and error.detail
    else:
        # The hub forwards what it accepted to viewers as UTF-8 text frames.
        json.dumps(value, ensure_ascii=False).encode("utf-8")


@PROPERTY
@given(st.binary())
def test_any_binary_frame_is_bad_json(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_json(frame)
    assert refused.value.code == "bad_json"


@PROPERTY
@given(st.recursive(st.text(st.characters(categories=["Cs", "Ll"]), max_size=4), st.lists))
def test_escaped_lone_surrogates_are_bad_json_never_forwarded(value: Any) -> None:
    """`"\\ud800"` is valid JSON, but a viewer cannot be sent it as UTF-8: refuse it up front."""
    text = json.dumps(value)  # ensure_ascii: surrogates are written as \\udxxx escapes
    try:
        parsed = parse_json(text)
    except ProtocolError as error:
        assert error.code == "bad_json"
        with pytest.raises(UnicodeEncodeError):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    else:  # (json.loads joins an escaped high and low surrogate into one character)
        assert parsed == json.loads(text)
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")


# -- (c) valid publishes round-trip -----------------------------------------------------------


def expected_rows(message: dict[str, Any]) -> tuple[Row, ...]:
    rows = []
    for row in message["data"]:
        cells = []
        for cell in row["TF_data"]:
            [tf] = [k for k in cell if k != "cell_color"]
            cells.append(Cell(tf, cell[tf], cell["cell_color"]))
        rows.append(Row(row["pair"], tuple(cells), row["sum"], row["sum_cell_color"]))
    return tuple(rows)


@PROPERTY
@given(valid_publishes, st.booleans())
def test_valid_publish_round_trips_with_every_field_and_extra_kept(
    message: dict[str, Any], ascii_only: bool
) -> None:
    text = json.dumps(message, ensure_ascii=ascii_only)
    obj = parse_json(text)
    before = copy.deepcopy(obj)
    publish = DECODER.publish(obj)
    assert (publish.key, publish.src, publish.client_id) == (
        message["key"],
        message["src"],
        message["clientId"],
    )
    assert publish.table == (message["key"], message["src"])
    assert publish.data == expected_rows(message)
    assert obj == before == message  # nothing dropped or changed: extras are forwarded as sent


# -- (c2) the hub's fast path agrees with the model ---------------------------------------------


@PROPERTY
@given(json_values | mangled_publishes() | valid_publishes)
def test_the_fast_check_vouches_only_for_what_the_model_accepts(value: Any) -> None:
    """`Decoder.accept` skips the model when `looks_valid` says so: it must never be wrong."""
    try:
        obj = parse_json(json.dumps(value))
    except ProtocolError:
        return
    if not isinstance(obj, dict):
        return
    try:
        model = DECODER.publish(obj).head
    except ProtocolError as refused:
        assert not looks_valid(obj, MAX_ROWS), refused.detail
        with pytest.raises(ProtocolError) as again:
            DECODER.accept(obj)
        assert (again.value.code, again.value.detail) == (refused.code, refused.detail)
    else:
        assert DECODER.accept(obj) == model


@PROPERTY
@given(valid_publishes)
def test_the_fast_check_takes_every_valid_publish(message: dict[str, Any]) -> None:
    assert looks_valid(parse_json(json.dumps(message)), MAX_ROWS)


# -- (d) examples ---------------------------------------------------------------------------


def row(**fields: Any) -> dict[str, Any]:
    return {
        "pair": "EURUSD",
        "TF_data": [{"M1": 1.5, "cell_color": "clrGreen"}, {"H1": -0.4, "cell_color": "clrRed"}],
        "sum": 1.1,
        "sum_cell_color": "clrGreen",
        **fields,
    }


def publish(**fields: Any) -> dict[str, Any]:
    return {"key": "EA1", "src": "EURUSD_PERIOD_H1", "clientId": "EA1_1", "data": [row()], **fields}


def refusal(text: str | bytes, decoder: Decoder = DECODER) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        decoder.publish(parse_json(text))
    return refused.value


@pytest.mark.parametrize(
    "text",
    [
        '{"key":"EA1","data":[{"sum":NaN}]}',
        '{"key":"EA1","data":[{"sum":Infinity}]}',
        '{"key":"EA1","data":[{"sum":-Infinity}]}',
        "NaN",
        json.dumps(publish(data=[row(sum=math.nan)])),
        json.dumps(publish(data=[row(TF_data=[{"M1": math.inf, "cell_color": "x"}])])),
    ],
)
def test_nan_and_infinity_are_bad_json(text: str) -> None:
    error = refusal(text)
    assert error.code == "bad_json"
    assert "not valid JSON" in error.detail


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000 + "1" + "}" * 100_000,
        json.dumps(publish())[:-1] + ',"deep":' + "[" * 50_000 + "]" * 50_000 + "}",
    ],
)
def test_deeply_nested_json_is_bad_json_not_a_recursion_error(text: str) -> None:
    error = refusal(text)  # a RecursionError would escape pytest.raises(ProtocolError)
    assert (error.code, error.detail) == ("bad_json", "nested too deeply")


def test_too_many_rows_are_refused_naming_the_limit() -> None:
    decoder = Decoder(max_rows=500)
    assert len(decoder.publish(publish(data=[row()] * 500)).data) == 500
    error = refusal(json.dumps(publish(data=[row()] * 501)), decoder)
    assert (error.code, error.detail) == ("bad_schema", "$.data: at most 500 rows, got 501")


def test_too_many_cells_are_refused_naming_the_limit() -> None:
    cells_33 = [{f"T{n}": n, "cell_color": "c"} for n in range(33)]
    error = refusal(json.dumps(publish(data=[row(), row(TF_data=cells_33)])))
    assert error.detail == "$.data[1].TF_data: at most 32 timeframe cells, got 33"


class CountingRow(dict[str, Any]):
    """A row that counts how often the decoder looks into it."""

    looked = 0

    def __getitem__(self, key: str) -> Any:
        CountingRow.looked += 1
        return super().__getitem__(key)


def test_100000_rows_are_refused_without_looking_at_a_single_row() -> None:
    CountingRow.looked = 0
    probe = CountingRow(row())
    assert Decoder(2).publish(publish(data=[probe])).data[0].pair == "EURUSD"
    assert CountingRow.looked > 0  # the probe does count what the decoder reads

    CountingRow.looked = 0
    with pytest.raises(ProtocolError) as refused:
        Decoder(500).publish(publish(data=[probe] * 100_000))
    assert refused.value.detail == "$.data: at most 500 rows, got 100000"
    assert CountingRow.looked == 0  # refused on the length alone: the cost does not grow with it

    error = refusal(json.dumps(publish(data=[{"pair": "X"}] * 100_000)), Decoder(500))
    assert (error.code, error.detail) == ("bad_schema", "$.data: at most 500 rows, got 100000")


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        (
            publish(
                data=[row(TF_data=[{"M1": 1, "cell_color": "a"}, {"M5": "1.2", "cell_color": "a"}])]
            ),
            "$.data[0].TF_data[1]: expected a number, got string",
        ),
        (
            publish(data=[row(), row(), row(TF_data=[{"M1": 1}])]),
            "$.data[2].TF_data[0]: missing cell_color",
        ),
        (
            publish(data=[row(TF_data=[{"M1": 1, "H1": 2, "cell_color": "a"}])]),
            "$.data[0].TF_data[0]: expected exactly one timeframe field besides cell_color, "
            "got ['M1', 'H1']",
        ),
        (
            publish(data=[row(TF_data=[{"M 1": 1, "cell_color": "a"}])]),
            "$.data[0].TF_data[0]: timeframe name 'M 1' is not 1 to 16 of A-Z a-z 0-9 _",
        ),
        (publish(data=[row(), row(sum=True)]), "$.data[1].sum: expected a number, got boolean"),
        (
            publish(data=[row(sum_cell_color="x" * 65)]),
            "$.data[0].sum_cell_color: must be at most 64 characters, no control characters",
        ),
        (publish(data=[row(pair="")]), "$.data[0].pair: must be 1 to 64 characters"),
        (publish(clientId="EA\x07"), "$.clientId: must not hold control characters"),
        (publish(key="EA\x85"), "$.key: must not hold control characters"),  # C1 (NEL)
        (publish(clientId=7), "$.clientId: expected a string, got number"),
        (publish(data={"rows": []}), "$.data: expected a list, got object"),
        (publish(data=[[]]), "$.data[0]: expected an object, got array"),
        ({"key": "EA1", "clientId": "c", "data": []}, "$.src: required field missing"),
        ([publish()], "$: expected an object, got array"),
    ],
)
def test_schema_errors_name_the_wire_path(message: Any, detail: str) -> None:
    error = refusal(json.dumps(message))
    assert (error.code, error.detail) == ("bad_schema", detail)


def test_schema_errors_use_wire_names_never_python_attribute_names() -> None:
    message = publish(clientId=1, data=[row(TF_data=5, sum_cell_color=None)])
    error = refusal(json.dumps(message))
    assert error.detail.split("; ") == [
        "$.clientId: expected a string, got number",
        "$.data[0].TF_data: expected a list, got number",
        "$.data[0].sum_cell_color: expected a string, got null",
    ]
    assert not re.search(r"client_id|\.cells|sum_color", error.detail)


def test_extra_fields_are_accepted_and_left_in_place_for_viewers() -> None:
    message = publish(note="kept", nested={"a": [1, 2.5, None]}, data=[row(spread=0.7, tags=["x"])])
    obj = parse_json(json.dumps(message))
    decoded = DECODER.publish(obj)
    assert decoded.data[0].sum == 1.1 and decoded.client_id == "EA1_1"
    assert obj == message  # the object the hub forwards still holds every extra field


def test_large_finite_numbers_are_accepted_and_out_of_range_ones_refused_by_path() -> None:
    assert decode(json.dumps(publish(data=[row(sum=1.7976931348623157e308)]))).data[0].sum > 1e308
    error = refusal(json.dumps(publish()).replace('"sum": 1.1', '"sum": 1e400'))
    assert (error.code, error.detail) == ("bad_schema", "$.data[0].sum: expected a finite number")
    error = refusal(json.dumps(publish(data=[row(), row(sum=10**400)])))  # no float holds it
    assert error.code == "bad_schema" and error.detail.startswith("$.data[1].sum: ")


def test_lone_surrogate_is_bad_json_but_an_escaped_surrogate_pair_is_text() -> None:
    for text in ('"\\ud800"', '{"key":"EA\\uDC00"}', '{"x":["a\\ud83d"]}', '{"\\ud800":1}'):
        with pytest.raises(ProtocolError) as refused:
            parse_json(text)
        assert refused.value.code == "bad_json", text
    assert parse_json('"\\ud83d\\ude00"') == "\U0001f600"
    assert parse_json('"\\\\ud800"') == "\\ud800"  # an escaped backslash, then plain letters
    assert decode(json.dumps(publish(key="EA\U0001f600"))).key == "EA\U0001f600"
