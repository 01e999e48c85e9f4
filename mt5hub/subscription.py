"""Which tables a viewer is sent: what it subscribed to, within what its token grants.

A viewer names tables by `key` and `src` patterns: an exact name, a prefix with a trailing `*`
(`EA*`), or `*` for any. `/ws?keys=EA1,EA2&src=...` subscribes at connect (no parameters: every
table, as in protocol v1); `{"type":"subscribe"}` and `{"type":"unsubscribe"}` change it later.
The rules are kept in order and the last one that matches a table decides, so an unsubscribe
can cut one table out of a wider subscribe (`*`, then not `EA3`) and a later subscribe can put
it back. A scoped viewer token (mt5hub.config.ViewerGrant) bounds all of it: a table whose key
the grant does not allow is never sent, and asking for it is refused with `forbidden_key`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import attrs

from .errors import ProtocolError

TableId = tuple[str, str]  # (key, src)
ANY = "*"
MAX_PATTERN = 129  # a 128-character name and its `*`
MAX_RULES = 256  # subscribe/unsubscribe rules a viewer may hold: each one is work per table


def _matches(pattern: str, name: str) -> bool:
    if pattern.endswith(ANY):
        return name.startswith(pattern[:-1])
    return name == pattern


class Grant(Protocol):
    """What a viewer's token lets it see (mt5hub.config.ViewerGrant)."""

    @property
    def keys(self) -> tuple[str, ...]: ...

    def allows(self, key: str) -> bool:
        """Whether the viewer may see tables of this key."""
        ...

    def covers(self, pattern: str) -> bool:
        """Whether every key this pattern matches is allowed."""
        ...


@attrs.frozen
class Selector:
    """Tables whose key matches `key` and whose src matches `src` (patterns, see the module)."""

    key: str = ANY
    src: str = ANY

    def matches(self, table: TableId) -> bool:
        return _matches(self.key, table[0]) and _matches(self.src, table[1])


def selectors(keys: Sequence[str] | None, src: Sequence[str] | None) -> list[Selector]:
    """Every (key, src) pair of the two lists; a list left out means any."""
    return [Selector(k, s) for k in (keys or [ANY]) for s in (src or [ANY])]


def query_selectors(keys: str | None, src: str | None) -> list[Selector] | None:
    """The subscription asked for in `/ws?keys=A,B*&src=...` (comma-separated); None: all."""
    if keys is None and src is None:
        return None
    split = [
        [p for p in value.split(",") if p] if value is not None else None for value in (keys, src)
    ]
    for patterns in split:
        for pattern in patterns or ():
            _check_pattern(pattern)
    return selectors(*split)


def message_selectors(message: dict[str, Any]) -> list[Selector]:
    """The selectors of a subscribe or unsubscribe message: `keys` and `src`, lists of patterns
    (every combination; one left out means any), and/or `tables`, a list of `{"key","src"}`
    (each one a selector: a dashboard hiding some panels names them in one message)."""
    chosen: list[Selector] = []
    tables = message.get("tables")
    if tables is not None:
        if not isinstance(tables, list) or not all(
            isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("src"), str)
            for t in tables
        ):
            raise ProtocolError("schema", 'tables: expected a list of {"key": ..., "src": ...}')
        for t in tables:
            _check_pattern(t["key"])
            _check_pattern(t["src"])
        chosen = [Selector(t["key"], t["src"]) for t in tables]
    lists = []
    for field in ("keys", "src"):
        value = message.get(field)
        if value is not None:
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ProtocolError("schema", f"{field}: expected a list of strings")
            for pattern in value:
                _check_pattern(pattern)
        lists.append(value)
    if tables is None or lists != [None, None]:
        chosen += selectors(*lists)
    return chosen


def _check_pattern(pattern: str) -> None:
    if not 1 <= len(pattern) <= MAX_PATTERN or any(ord(c) < 0x20 for c in pattern):
        raise ProtocolError("schema", f"{pattern[:40]!r}: a pattern is 1 to 128 characters, and "
                            "may end with *")  # fmt: skip


class Subscription:
    """One viewer's rules, and the grant they are bounded by.

    `everything` is the common case (no parameters, no scope): the fan-out then offers the viewer
    every frame without asking `wants`. (An attribute, kept with the rules: the fan-out asks it
    each time a viewer comes back from `away`, thousands of times a second.)
    """

    def __init__(self, grant: Grant | None = None, initial: list[Selector] | None = None) -> None:
        self.grant = grant if grant is not None and ANY not in grant.keys else None
        chosen = [Selector()] if initial is None else initial
        self._set([(True, s) for s in chosen])

    def _set(self, rules: list[tuple[bool, Selector]]) -> None:
        self._rules = rules
        self.everything = self.grant is None and rules == [(True, Selector())]

    @classmethod
    def at_connect(
        cls, grant: Grant | None, asked: list[Selector] | None
    ) -> tuple[Subscription, list[str]]:
        """The subscription of a viewer that asked for these tables (None: every table it may
        see), and the key patterns it asked for beyond its grant, which it does not get."""
        subscription = cls(grant)
        if asked is None:
            return subscription, []
        refused = subscription.forbidden(asked)
        subscription._set([(True, s) for s in asked if s.key not in refused])
        return subscription, refused

    def wants(self, table: TableId) -> bool:
        if self.grant is not None and not self.grant.allows(table[0]):
            return False
        for include, selector in reversed(self._rules):
            if selector.matches(table):
                return include
        return False

    def forbidden(self, chosen: Iterable[Selector]) -> list[str]:
        """Key patterns among these that reach beyond the grant (`forbidden_key`)."""
        if self.grant is None:
            return []
        return sorted({s.key for s in chosen if not self.grant.covers(s.key)})

    def change(self, include: bool, chosen: Sequence[Selector]) -> None:
        """Add rules at the end (they decide over older ones). Rules that the new ones make
        moot (the same selector) are dropped, so a viewer toggling a panel holds few rules."""
        dropped = set(chosen)
        kept = [(inc, s) for inc, s in self._rules if s not in dropped]
        if len(kept) + len(chosen) > MAX_RULES:
            raise ProtocolError("too_many_rules", f"a viewer may hold {MAX_RULES} subscribe and "
                                "unsubscribe rules; reconnect with fewer")  # fmt: skip
        self._set(kept + [(include, s) for s in chosen])
