"""Patches (protocol v1.1): an update as only what changed since the update before it.

A patch is made at most once per update, when the first delta viewer that holds the update
before it is about to be sent it, and then shared (text and WebSocket frames) by every other
such viewer, like the update itself. A viewer that does not hold that update (its slot was
conflated, it was away, it just subscribed) is sent the whole update instead: a viewer applying
patches can never drift from the hub's state. The format is mt5hub.delta's.
"""

from __future__ import annotations

import json
from typing import Any

from .delta import diff
from .fanout import Frame
from .state import encode


def _doc(frame: Frame) -> dict[str, Any]:
    if frame.doc is None:
        frame.doc = json.loads(frame.text)
    return frame.doc


def patch_for(frame: Frame) -> Frame | None:
    """The patch that turns the update before this one into it; None if that one is gone.

    Only the latest update of a table keeps the one before it (`Frame.previous`), so at most two
    parsed updates per table are held, and only while delta viewers ask for patches.
    """
    if frame.patch is None:
        previous = frame.previous
        if previous is None or frame.slot is None:
            return None
        new = _doc(frame)
        body = diff(_doc(previous), new)
        _, key, src = frame.slot
        head = {"type": "patch", "key": key, "src": src, "seq": frame.seq, "base": frame.base}
        text = encode({**head, "ts": new.get("ts"), **body})
        frame.patch = Frame(text, frame.slot, frame.received)
        previous.doc = None  # no later patch starts from it
    return frame.patch
