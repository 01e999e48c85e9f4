"""Placeholder until the real diff lands: a patch that carries the whole table."""

from __future__ import annotations

from typing import Any

HEAD = frozenset({"type", "seq", "ts", "online"})


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {"set": {k: v for k, v in new.items() if k not in HEAD}}


def apply(old: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["set"])
