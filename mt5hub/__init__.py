"""mt5hub: live MetaTrader 5 signal tables, from EAs to browser dashboards.

`hypercorn --config hub.toml mt5hub:app` serves `app`, built from the same hub.toml (or the file
named by MT5HUB_CONFIG). Building it only reads the file; nothing starts before Hypercorn serves.
"""

from .routes import create_app

app = create_app()

__all__ = ["app", "create_app"]
