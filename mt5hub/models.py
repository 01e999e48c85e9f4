"""The publish message, modelled with attrs and decoded with cattrs.

Decoding is strict (a string is never silently turned into a number) and every refusal names the
path of the offending field, so an EA author can find the bug from the error frame alone. What the
model does not know (extra fields) is kept: the hub forwards the publisher's JSON as it came.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from .errors import ProtocolError

TF_NAME = re.compile(r"[A-Za-z0-9_]{1,16}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
COLOR_FIELD = "cell_color"
MAX_CELLS = 32


def _name(max_len: int) -> Any:
    """An attrs validator for identifiers shown to people: 1..max_len chars, no control chars."""

    def check(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
        if not 1 <= len(value) <= max_len:
            raise ValueError(f"{attribute.name}: must be 1 to {max_len} characters")
        if _CONTROL.search(value):
            raise ValueError(f"{attribute.name}: must not hold control characters")

    return check


def _color(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if len(value) > 64 or _CONTROL.search(value):
        raise ValueError(f"{attribute.name}: must be at most 64 characters, no control characters")


@attrs.frozen
class Cell:
    """One timeframe's value: on the wire `{"H1": 0.4, "cell_color": "clrGreen"}`."""

    tf: str
    value: float
    color: str = attrs.field(validator=_color)


@attrs.frozen
class Row:
    pair: str = attrs.field(validator=_name(64))
    cells: tuple[Cell, ...]
    sum: float
    sum_color: str = attrs.field(validator=_color)


@attrs.frozen
class Head:
    """Who published which table: all the hub needs of a publish it has validated."""

    key: str
    src: str
    client_id: str

    @property
    def table(self) -> tuple[str, str]:
        return (self.key, self.src)


@attrs.frozen
class Publish:
    """What a publisher sends: one signal table, identified by (key, src)."""

    key: str = attrs.field(validator=_name(128))
    src: str = attrs.field(validator=_name(128))
    client_id: str = attrs.field(validator=_name(128))
    data: tuple[Row, ...]

    @property
    def table(self) -> tuple[str, str]:
        return (self.key, self.src)

    @property
    def head(self) -> Head:
        return Head(self.key, self.src, self.client_id)


def _strict_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_json_type(value)}")
    return value


def _finite_number(value: Any, _type: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {_json_type(value)}")
    if not math.isfinite(value):  # json.loads below refuses NaN too; this guards huge ints
        raise ValueError("expected a finite number")
    return value


def _cell(value: Any, _type: type) -> Cell:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {_json_type(value)}")
    tfs = [k for k in value if k != COLOR_FIELD]
    if len(tfs) != 1:
        raise ValueError(f"expected exactly one timeframe field besides {COLOR_FIELD}, got {tfs}")
    tf = tfs[0]
    if not TF_NAME.fullmatch(tf):
        raise ValueError(f"timeframe name {tf!r} is not 1 to 16 of A-Z a-z 0-9 _")
    if COLOR_FIELD not in value:
        raise ValueError(f"missing {COLOR_FIELD}")
    return Cell(tf, _finite_number(value[tf], float), _strict_str(value[COLOR_FIELD], str))


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def make_converter(max_rows: int) -> cattrs.Converter:
    """A converter that knows the wire names (`TF_data`, `clientId`) and the hub's limits.

    Order matters: a generated hook captures the hooks of its fields when it is made.
    """
    conv = cattrs.Converter()
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(float, _finite_number)
    conv.register_structure_hook(Cell, _cell)
    _bound_length(conv, tuple[Cell, ...], MAX_CELLS, "timeframe cells")
    wire = cattrs.override
    row = make_dict_structure_fn(
        Row, conv, cells=wire(rename="TF_data"), sum_color=wire(rename="sum_cell_color")
    )
    conv.register_structure_hook(Row, _object_only(row))
    _bound_length(conv, tuple[Row, ...], max_rows, "rows")
    publish = make_dict_structure_fn(Publish, conv, client_id=wire(rename="clientId"))
    conv.register_structure_hook(Publish, _object_only(publish))
    return conv


def _object_only(hook: Any) -> Any:
    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {_json_type(value)}")
        return hook(value, type_)

    return structure


def _bound_length(conv: cattrs.Converter, type_: Any, max_len: int, what: str) -> None:
    """Refuse over-long lists before structuring them: 100,000 rows cost nothing to refuse."""
    inner = conv.get_structure_hook(type_)

    def structure(value: Any, type_: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {_json_type(value)}")
        if len(value) > max_len:
            raise ValueError(f"at most {max_len} {what}, got {len(value)}")
        return inner(value, type_)  # type: ignore[no-any-return]

    conv.register_structure_hook_func(lambda t: t == type_, structure)


class _Checked:
    """Strings seen to pass a check before (colours and timeframe names repeat in every table)."""

    def __init__(self, check: Any, size: int = 4096) -> None:
        self._check, self._size = check, size
        self._ok: set[str] = set()

    def __call__(self, value: Any) -> bool:
        if value in self._ok:
            return True
        if type(value) is not str or not self._check(value):
            return False
        if len(self._ok) < self._size:
            self._ok.add(value)
        return True


_good_color = _Checked(lambda v: len(v) <= 64 and not _CONTROL.search(v))
_good_tf = _Checked(lambda v: v != COLOR_FIELD and TF_NAME.fullmatch(v) is not None)


def _good_name(value: Any, max_len: int) -> bool:
    return type(value) is str and 1 <= len(value) <= max_len and not _CONTROL.search(value)


_BIG_INT = 2**1000  # (not folded by the compiler: a constant, so the hot loop never computes it)


def _good_number(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    return kind is int and -_BIG_INT < value < _BIG_INT  # beyond: let the model decide


def looks_valid(obj: dict[str, Any], max_rows: int) -> bool:
    """True only for publishes the model accepts; False means "ask the model" (see accept)."""
    try:
        if not (
            _good_name(obj["key"], 128)
            and _good_name(obj["src"], 128)
            and _good_name(obj["clientId"], 128)
        ):
            return False
        rows = obj["data"]
        if type(rows) is not list or len(rows) > max_rows:
            return False
        for row in rows:
            cells = row["TF_data"]
            if not (
                _good_name(row["pair"], 64)
                and _good_number(row["sum"])
                and _good_color(row["sum_cell_color"])
                and type(cells) is list
                and len(cells) <= MAX_CELLS
            ):
                return False
            for cell in cells:
                if type(cell) is not dict or len(cell) != 2 or COLOR_FIELD not in cell:
                    return False
                for name, value in cell.items():
                    if name == COLOR_FIELD:
                        if not _good_color(value):
                            return False
                    elif not (_good_tf(name) and _good_number(value)):
                        return False
    except (KeyError, TypeError):  # a missing field, or a row that is not an object
        return False
    return True


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# `"\ud800"` is valid JSON but no text: forwarded, it cannot be encoded as UTF-8 for viewers.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SCAN = _DECODER.scan_once  # type: ignore[attr-defined]  # C's scanner: a whole value at once
_SPACE = re.compile(r"[ \t\n\r]*")  # what JSON calls whitespace
_WIDE = 64  # top-level members walked one by one; a wider object is parsed in one go
_PAIRS = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=tuple)  # in C


class _TooWide(Exception):
    pass


def _skip_space(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    assert match is not None  # `*` matches nothing too
    return match.end()


def _top_level_pairs(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return items


def _loads(text: str) -> Any:
    """json.loads, but a name given twice in the top-level object is refused.

    Given twice, `key` (or `src`, `type`, ...) means what the parser makes of it: Python and
    browsers keep the last, other parsers the first, and the hub forwards the text as it came. So
    the hub and a viewer could disagree on which table, under which token, a publish is. (Nested
    objects keep the last of a repeated name, as browsers do.)

    The top level is walked by json's own object parser, C's scanner parsing each value: as fast
    as json.loads for a publish's handful of members. Past _WIDE members that walk would cost
    Python per member (4x json.loads for a frame of nothing else), so a wider object is parsed
    in C instead, twice: once as usual, once with its names (about 2x json.loads).
    """
    start = _skip_space(text, 0)
    if not text.startswith("{", start):
        return _DECODER.decode(text)
    members = 0

    def scan(s: str, at: int) -> tuple[Any, int]:
        nonlocal members
        members += 1
        if members > _WIDE:
            raise _TooWide
        return _SCAN(s, at)  # type: ignore[no-any-return]

    try:
        items, end = json.decoder.JSONObject(  # type: ignore[attr-defined]
            (text, start + 1), True, scan, None, _top_level_pairs, {}
        )
        end = _skip_space(text, end)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
        obj = dict(items)
    except _TooWide:
        obj, items = _DECODER.decode(text), _PAIRS.decode(text)
    if len(obj) < len(items):
        seen: set[str] = set()
        for name, _ in items:  # the first name given again (linear: there may be 100,000)
            if name in seen:
                break
            seen.add(name)
        path = f"$.{name}" if name.isidentifier() else f"$[{name[:40]!r}]"
        raise ProtocolError("bad_json", f"{path}: given more than once")
    return obj


def parse_json(text: str | bytes) -> Any:
    """json.loads without Python's extensions (NaN, Infinity) or a repeated top-level name, and
    with its failures named."""
    if isinstance(text, bytes):
        raise ProtocolError("bad_json", "binary frame: send JSON as a text frame")
    try:
        obj = _loads(text)
        if _ESCAPED_SURROGATE.search(text):  # rare: check precisely only then
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ProtocolError("bad_json", "nested too deeply") from None
    except UnicodeEncodeError:
        raise ProtocolError("bad_json", "a string holds a lone UTF-16 surrogate") from None
    except ValueError as exc:  # JSONDecodeError, huge integers, NaN
        raise ProtocolError("bad_json", str(exc)) from None
    return obj


class Decoder:
    """Turns a publisher's frame into a validated Publish plus the JSON object to forward."""

    def __init__(self, max_rows: int) -> None:
        self._conv = make_converter(max_rows)
        self._max_rows = max_rows

    def accept(self, obj: dict[str, Any]) -> Head:
        """Validate a publish as `publish` does, but build only its Head: the hub's hot path.

        Building the attrs model is the costliest step of a publish (docs/performance.md);
        `looks_valid` checks the same rules in one plain loop. Whatever it does not vouch for
        goes through the model, which names the problem precisely (tests/test_models.py checks
        that the two agree).
        """
        if looks_valid(obj, self._max_rows):
            return Head(obj["key"], obj["src"], obj["clientId"])
        return self.publish(obj).head

    def publish(self, obj: dict[str, Any]) -> Publish:
        try:
            publish: Publish = self._conv.structure(obj, Publish)
        except cattrs.BaseValidationError as exc:
            messages = cattrs.transform_error(exc, format_exception=_describe)
            raise ProtocolError("bad_schema", "; ".join(map(_wire_path, messages[:5]))) from None
        except (TypeError, ValueError) as exc:  # a hook failing at the top level
            raise ProtocolError("bad_schema", f"$: {exc}") from None
        return publish


_WIRE_NAMES = {".client_id": ".clientId", ".cells": ".TF_data", ".sum_color": ".sum_cell_color"}


def _wire_path(message: str) -> str:
    """cattrs says `reason @ $.data[0].cells`; a publisher wants `$.data[0].TF_data: reason`."""
    reason, _, path = message.rpartition(" @ ")
    for attr, wire in _WIRE_NAMES.items():
        path = re.sub(re.escape(attr) + r"(?=$|[.\[])", wire, path)
    field, sep, rest = reason.partition(": ")
    if sep and field.isidentifier():  # an attrs validator names its own field
        path, reason = f"{path}.{_WIRE_NAMES.get('.' + field, '.' + field)[1:]}", rest
    return f"{path}: {reason}"


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    return str(exc) or type(exc).__name__
