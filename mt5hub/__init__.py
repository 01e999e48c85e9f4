"""mt5hub: live MetaTrader 5 signal tables, from EAs to browser dashboards.

`hypercorn --config hub.toml mt5hub:app` serves `app`. Importing the package does nothing else:
the app is built from hub.toml (or the file named by MT5HUB_CONFIG) when Hypercorn first calls it
(its lifespan startup), so that `mt5hub check-config` and `mt5hub.testing` can import the package
in any folder, and a hub.toml the hub refuses is reported when it is served.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .routes import create_app


class _App:
    """The ASGI app Hypercorn serves: the Quart-Trio app of mt5hub.routes, made on first use."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            try:
                self._app = create_app()
            except ConfigError as exc:
                if scope["type"] != "lifespan":
                    raise
                # As a startup that failed: Hypercorn logs the reason and stops serving.
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
        await self._app(scope, receive, send)


app = _App()

__all__ = ["app", "create_app"]
