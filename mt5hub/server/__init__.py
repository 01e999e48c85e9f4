"""The Hypercorn adapter: the only code that reaches into Hypercorn's, wsproto's, trio's internals.

Through ASGI alone the hub would be slower and less safe: every frame a trip through Hypercorn's
stream and wsproto per viewer (compressed once per viewer too), no way to abort a socket stuck
in a send, no WebSocket pings to pace a slow viewer, and a handful of holes hostile clients
reach (see `_hardening`). So, for each HTTP/1.1 WebSocket:

- `_hardening` replaces Hypercorn's WSStream event handler: the holes closed, and every message
  and pong handed to the connection's `Link` as it is read (`Link.feed`, `Link.pong`);
- `_transport` writes frames made once for all viewers straight to the connection's socket
  (or its TLS records), under Hypercorn's own send lock, and aborts a stuck socket.

Nothing changes at import. `install()` puts the adapter in place when the app starts serving. If
the internals it needs are not there (another Hypercorn or wsproto than the pinned ones), the hub
refuses to start, naming the versions it supports, unless `asgi_only = true` in [mt5hub]: then it
serves on Hypercorn's public ASGI path alone and logs what is off.
See docs/decisions/003-hypercorn-adapter.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import version

from ..errors import ConfigError
from . import _hardening
from ._hardening import follow_parent, refuse_to_start
from ._transport import LINK, Link, QuartTransport, TrackConnections, _Adapter, direct, wire

__all__ = [
    "LINK",
    "SUPPORTED",
    "Link",
    "QuartTransport",
    "TrackConnections",
    "direct",
    "follow_parent",
    "install",
    "refuse_to_start",
    "wire",
]

log = logging.getLogger("mt5hub")

# The versions the adapter is built and tested on (pinned in pyproject.toml and requirements.lock).
SUPPORTED = {"hypercorn": "0.18.0", "wsproto": "1.3.2", "trio": "0.35.0"}
OFF_WITHOUT_ADAPTER = (
    "WebSocket pings to pace slow viewers (flow control)",
    "frames made and compressed once for all viewers",
    "aborting a socket stuck in a send (a stalled viewer holds its task until the peer leaves)",
    "shutdown's 1001 to every connection at once",
    "the hardening of Hypercorn's WebSocket stream (bytes before the handshake, refused "
    "handshakes left open, memory after a 1009, silent drops on bad frames, deflate bombs, "
    "request heads bounded whatever the reads)",
)


def install(
    on_close: Callable[[str, int], None],
    max_message: int,
    asgi_only: bool,
    *,
    max_head_bytes: int = 16 * 1024,
    max_headers: int = 100,
    on_reject: Callable[[str], None] | None = None,
) -> str:
    """Put the adapter in place for this process; "direct", or "asgi" if allowed to go without.

    `on_close(role, code)` and `on_reject(reason)` count what the adapter closes and refuses;
    `max_message` bounds a message (1009), `max_head_bytes` and `max_headers` a request head (431).

    Raises ConfigError (the hub refuses to start) when the internals it needs are missing and
    `asgi_only` is not set.
    """
    versions = ", ".join(f"{name} {version(name)}" for name in SUPPORTED)
    wanted = ", ".join(f"{name} {v}" for name, v in SUPPORTED.items())
    if missing := _hardening.missing():
        if not asgi_only:
            raise ConfigError(
                f"refusing to start: {versions} lack what the hub's adapter needs "
                f"({'; '.join(missing)}); it supports {wanted} (pinned in pyproject.toml). "
                f"Install those, or set asgi_only = true in [mt5hub] to serve on Hypercorn's "
                f"public ASGI path alone (slower, and without: "
                f"{'; '.join(OFF_WITHOUT_ADAPTER)})"
            )
        _Adapter.direct = False
        log.warning(
            "asgi_only: serving on Hypercorn's public ASGI path alone (%s); off: %s",
            versions,
            "; ".join(OFF_WITHOUT_ADAPTER),
        )
        return "asgi"
    if asgi_only:
        _Adapter.direct = False
        log.warning("asgi_only = true: off: %s", "; ".join(OFF_WITHOUT_ADAPTER))
        return "asgi"
    if versions != wanted:
        log.warning("adapter on untested versions: %s (tested: %s)", versions, wanted)
    _hardening.install(
        on_close,
        max_message,
        max_head_bytes=max_head_bytes,
        max_headers=max_headers,
        on_reject=on_reject,
    )
    _Adapter.direct = True
    return "direct"
