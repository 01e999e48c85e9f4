"""One typed configuration object, read from the same hub.toml that Hypercorn reads.

Hypercorn takes its own keys (binds, certificates, frame size) from the file; the hub reads the
`[mt5hub]` table, plus the few Hypercorn keys it must agree with. Secrets may come from the
environment instead of the file, so that hub.toml can be committed.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs

from .errors import ConfigError

DEFAULT_TOKEN = "supersecret123"  # the seed's token: fine on loopback, refused on a public bind
ANY_KEY = "*"


@attrs.frozen
class TokenGrant:
    """A publisher token and the table keys it may publish (`*`: any)."""

    token: str = attrs.field(repr=False)  # never logged
    keys: tuple[str, ...] = (ANY_KEY,)
    name: str = ""

    def allows(self, key: str) -> bool:
        return ANY_KEY in self.keys or key in self.keys


@attrs.frozen
class Settings:
    """The `[mt5hub]` table. Times are seconds; see docs/protocol.md for what each limit does."""

    tokens: tuple[TokenGrant, ...] = (TokenGrant(DEFAULT_TOKEN),)
    viewer_tokens: tuple[str, ...] = attrs.field(default=(), repr=False)
    allowed_origins: tuple[str, ...] = ()
    max_rows: int = 500
    rate_limit: float = 50.0
    rate_burst: int = 100
    flood_seconds: float = 5.0
    ping_interval: float = 10.0
    publisher_timeout: float = 30.0
    viewer_timeout: float = 30.0
    viewer_buffer: int = 64
    slow_viewer_timeout: float = 10.0
    viewer_send_buffer: int = 256 * 1024  # bytes of kernel send buffer per viewer; 0: the OS's
    max_viewers: int = 2000  # viewer connections in all: more get HTTP 503
    max_viewers_per_ip: int = 50  # viewer connections from one client address: more get 429
    max_publishers: int = 1000  # publisher connections (after their token was accepted)
    trusted_proxies: tuple[str, ...] = ()  # addresses whose X-Forwarded-For names the client
    log_level: str = "INFO"
    # "" keeps state in this process; "redis://host:6379/0" shares it with every hub on that Redis
    backplane: str = attrs.field(default="", repr=False)  # may hold a password
    backplane_prefix: str = "mt5hub"  # Redis key prefix: one per deployment sharing a Redis
    backplane_heartbeat: float = 2.0  # seconds between a hub's heartbeats in Redis
    backplane_ttl: float = 10.0  # a hub silent this long is dead: its tables go offline
    backplane_timeout: float = 5.0  # a Redis call slower than this counts as an outage
    # The latest state of every table survives a restart in this file (relative: to the working
    # directory); "" keeps nothing. Unused with a backplane, where the state lives in Redis.
    state_file: str = "mt5hub-state.json"
    state_interval: float = 1.0  # at most one write per this many seconds, and only after a change

    def problems(self) -> list[str]:
        """What is wrong beyond the types, which cattrs checks."""
        found = []
        if self.backplane and not self.backplane.startswith(("redis://", "rediss://", "unix://")):
            found.append("backplane: expected redis://, rediss:// or unix:// (or empty)")
        if self.backplane_ttl < 2 * self.backplane_heartbeat:
            found.append("backplane_ttl: must be at least twice backplane_heartbeat")
        if not self.state_interval > 0:  # also refuses NaN
            found.append("state_interval: must be more than 0 seconds")
        for name in ("max_viewers", "max_viewers_per_ip", "max_publishers"):
            if getattr(self, name) < 1:
                found.append(f"{name}: must be at least 1")
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                found.append(f"trusted_proxies: {network!r} is not an address or network")
        return found


@attrs.frozen
class HubConfig:
    settings: Settings = Settings()
    binds: tuple[str, ...] = ()
    max_frame_bytes: int = 1024 * 1024
    workers: int = 1
    source: str = "<defaults>"


_converter = cattrs.Converter(forbid_extra_keys=True)


def _parse_tokens_env(value: str) -> list[dict[str, Any]]:
    """`MT5HUB_TOKENS="tokA,tokB:EA1|EA2"`: comma-separated tokens, each maybe limited to keys."""
    grants: list[dict[str, Any]] = []
    for n, entry in enumerate(filter(None, (e.strip() for e in value.split(","))), 1):
        token, _, keys = entry.partition(":")
        grants.append(
            {"token": token, "keys": keys.split("|") if keys else [ANY_KEY], "name": f"env#{n}"}
        )
    if not grants:
        raise ConfigError("MT5HUB_TOKENS is set but holds no token")
    return grants


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> HubConfig:
    """Read hub.toml (path from `MT5HUB_CONFIG`, default ./hub.toml) and apply env overrides."""
    environ = os.environ if environ is None else environ
    file = Path(path or environ.get("MT5HUB_CONFIG", "hub.toml"))
    raw: dict[str, Any] = {}
    if file.exists():
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from exc
    table = dict(raw.get("mt5hub", {}))
    if "MT5HUB_TOKENS" in environ:
        table["tokens"] = _parse_tokens_env(environ["MT5HUB_TOKENS"])
    if "MT5HUB_BACKPLANE" in environ:
        table["backplane"] = environ["MT5HUB_BACKPLANE"]
    if "MT5HUB_STATE_FILE" in environ:  # e.g. systemd's StateDirectory, outside the checkout
        table["state_file"] = environ["MT5HUB_STATE_FILE"]
    if "MT5HUB_VIEWER_TOKENS" in environ:
        table["viewer_tokens"] = [t for t in environ["MT5HUB_VIEWER_TOKENS"].split(",") if t]
    try:
        settings = _converter.structure(table, Settings)
    except cattrs.BaseValidationError as exc:
        problems = "; ".join(cattrs.transform_error(exc, path="mt5hub"))
        raise ConfigError(f"{file}: {problems}") from exc
    if wrong := settings.problems():
        raise ConfigError(f"{file}: [mt5hub] " + "; ".join(wrong))
    binds = tuple(_as_list(raw.get("bind", ["127.0.0.1:8000"]))) + tuple(
        _as_list(raw.get("insecure_bind", []))
    )
    return HubConfig(
        settings=settings,
        binds=binds,
        max_frame_bytes=int(raw.get("websocket_max_message_size", 1024 * 1024)),
        workers=int(raw.get("workers", 1)),
        source=str(file),
    )


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def is_loopback_bind(bind: str) -> bool:
    """True for binds only this machine can reach (127.0.0.0/8, ::1, localhost, unix sockets)."""
    if bind.startswith("unix:"):
        return True
    host = bind.rsplit(":", 1)[0] if not bind.startswith("[") else bind[1 : bind.index("]")]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname, `fd://`, an empty host: assume the world can reach it


def check_safe_to_serve(config: HubConfig) -> None:
    """Refuse the seed's well-known token anywhere but loopback: it is printed in every README."""
    public = [b for b in config.binds if not is_loopback_bind(b)]
    default = [g for g in config.settings.tokens if g.token == DEFAULT_TOKEN]
    if public and default:
        raise ConfigError(
            f"refusing to start: the default publisher token is enabled and the hub binds "
            f"{', '.join(public)}, which is not loopback. Set your own tokens in [mt5hub] of "
            f"{config.source} or in MT5HUB_TOKENS (scripts/new_token.py makes one)."
        )
    if not config.settings.tokens:
        raise ConfigError(f"{config.source}: no publisher token configured")
    if config.workers > 1 and not config.settings.backplane:
        raise ConfigError(
            f"refusing to start: workers = {config.workers} in {config.source}, but each worker "
            f'would hold its own tables and viewers. Set backplane = "redis://..." in '
            f"[mt5hub] (or MT5HUB_BACKPLANE), or workers = 1."
        )
