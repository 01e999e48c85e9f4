"""One typed configuration object, read from the same hub.toml that Hypercorn reads.

Hypercorn takes its own keys (binds, certificates, frame size) from the file; the hub reads the
`[mt5hub]` table, plus the few Hypercorn keys it must agree with. Secrets may come from the
environment instead of the file, so that hub.toml can be committed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from .errors import ConfigError

DEFAULT_TOKEN = "supersecret123"  # the seed's token: fine on loopback, refused on a public bind
ANY_KEY = "*"
STATUS_ACCESS = ("auto", "any", "private", "loopback", "token")  # who may read /healthz, /metrics
HASHED = "sha256:"  # a token given as "sha256:<64 hex digits>" is stored as its hash only
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def token_digest(token: str) -> bytes:
    """What the hub keeps of a token: its SHA-256.

    Tokens are random (`mt5hub token new` draws 256 bits), so a fast hash is enough: nobody can
    search that space, and a slow password hash would let anyone burn the hub's CPU with bad
    handshakes.
    """
    return hashlib.sha256(token.encode()).digest()


def configured_digest(value: str) -> bytes:
    """The digest a configured token stands for: "sha256:<hex>" as given, a plain token hashed."""
    if value.startswith(HASHED):
        return bytes.fromhex(value[len(HASHED) :])
    return token_digest(value)


def hash_problem(value: str) -> str | None:
    if value.startswith(HASHED) and not _HEX_DIGEST.fullmatch(value[len(HASHED) :]):
        return "expected sha256: and 64 lowercase hex digits (`mt5hub token new` prints it)"
    return None


@attrs.frozen
class TokenGrant:
    """A publisher token (plain, or "sha256:<hex>") and the table keys it may publish (`*`: any)."""

    token: str = attrs.field(repr=False)  # never logged
    keys: tuple[str, ...] = (ANY_KEY,)
    name: str = ""

    def allows(self, key: str) -> bool:
        return ANY_KEY in self.keys or key in self.keys


def _matches(pattern: str, key: str) -> bool:
    """A key pattern: an exact key, `P*` (every key starting with P), or `*` (any key)."""
    if pattern.endswith(ANY_KEY):
        return key.startswith(pattern[:-1])
    return key == pattern


@attrs.frozen
class ViewerGrant:
    """A viewer token (plain, or "sha256:<hex>") and the table keys its dashboards may see.

    Keys are patterns: "EA1" exactly, "EA*" any key starting with "EA", "*" any key. The hub's
    fan-out enforces it; this class only answers what it allows.
    """

    token: str = attrs.field(default="", repr=False)  # never logged
    keys: tuple[str, ...] = (ANY_KEY,)
    name: str = ""

    def allows(self, key: str) -> bool:
        """True if the table `key` matches one of the grant's patterns."""
        return any(_matches(pattern, key) for pattern in self.keys)

    def covers(self, pattern: str) -> bool:
        """True if every key `pattern` could match is allowed (a viewer asking for "EA*" may
        have it only from a grant of "EA*", "E*" or "*", not from one of "EA1")."""
        if not pattern.endswith(ANY_KEY):
            return self.allows(pattern)
        prefix = pattern[:-1]
        return any(q.endswith(ANY_KEY) and prefix.startswith(q[:-1]) for q in self.keys)

    def problem(self) -> str | None:
        """What is wrong with the entry, in words that never hold the token."""
        if problem := hash_problem(self.token):
            return problem
        if not self.token:
            return "token: must not be empty"
        if not self.keys:
            return 'keys: must name at least one key or pattern ("*": any)'
        for pattern in self.keys:
            if not pattern or ANY_KEY in pattern[:-1]:
                return f"keys: {pattern!r} is not a key, a prefix ending in * or *"
        return None


ALL = ViewerGrant()  # what every viewer may see on a hub without viewer tokens


@attrs.frozen
class Settings:
    """The `[mt5hub]` table. Times are seconds; see docs/protocol.md for what each limit does."""

    tokens: tuple[TokenGrant, ...] = (TokenGrant(DEFAULT_TOKEN),)
    # Empty: dashboards need no token and see every table. Else a token is needed, and it shows
    # the tables its grant allows (a plain or hashed string: all of them).
    viewer_tokens: tuple[ViewerGrant, ...] = attrs.field(default=(), repr=False)
    allowed_origins: tuple[str, ...] = ()
    # Who may read /healthz and /metrics: "any" client, "private" (loopback and private
    # networks), "loopback", or "token" (status_token only). "auto": "any" when every bind is
    # loopback (the proxy in front decides), else "private". status_token always admits.
    status_access: str = "auto"
    status_token: str = attrs.field(default="", repr=False)  # plain or "sha256:<hex>"
    max_rows: int = 500
    rate_limit: float = 50.0
    rate_burst: int = 100
    flood_seconds: float = 5.0
    # Bytes per second per publisher connection, beside the frame rate: 50 frames/s of 28 x 9
    # tables (~14 KB each) is 0.7 MB/s. The burst lets a reconnecting EA send ~1,000 at once.
    byte_rate: float = 2 * 1024 * 1024
    byte_burst: int = 16 * 1024 * 1024
    # What publishers can make the hub hold: tables, bytes of one table's latest update (a
    # 500-row table of 9 timeframes is ~220 KB), bytes of every table's latest update together.
    max_tables: int = 10_000
    max_table_bytes: int = 256 * 1024
    max_state_bytes: int = 256 * 1024 * 1024
    # A request head (request line and headers) larger than this, or with more header lines,
    # is answered 431 whatever the reads it arrives in.
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100
    # Handshakes refused 401/403 that one client address (an IPv6 /64) may make per
    # `failed_handshake_window` seconds; past that it gets 429 with Retry-After.
    failed_handshakes: int = 20
    failed_handshake_window: float = 60.0
    # Hand freed memory back to the system (glibc's malloc_trim) once a burst of connections
    # has gone: see mt5hub/memory.py.
    trim_memory: bool = True
    ping_interval: float = 10.0
    publisher_timeout: float = 30.0
    viewer_timeout: float = 30.0
    viewer_buffer: int = 64  # frames without a table (snapshot, pings, errors) held per connection
    slow_viewer_timeout: float = 10.0
    viewer_send_buffer: int = 256 * 1024  # bytes of kernel send buffer per viewer; 0: the OS's
    # Flow control: how far behind its reading (by the age of an unanswered WebSocket ping) a
    # viewer may be and still be written to at once; past it, one write per pong. inf: none.
    viewer_lag: float = 0.05
    # How often a viewer that keeps up is pinged to measure that, at most: it may fall this plus
    # viewer_lag behind before the hub notices. A viewer that is behind is pinged on every write.
    viewer_lag_interval: float = 0.25
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
    # Serve on Hypercorn's public ASGI path alone, without mt5hub.server's adapter (for a
    # Hypercorn the adapter does not support): slower, and without its protections.
    asgi_only: bool = False

    def problems(self) -> list[str]:
        """What is wrong beyond the types, which cattrs checks."""
        found = []
        if self.backplane and not self.backplane.startswith(("redis://", "rediss://", "unix://")):
            found.append("backplane: expected redis://, rediss:// or unix:// (or empty)")
        if self.backplane_ttl < 2 * self.backplane_heartbeat:
            found.append("backplane_ttl: must be at least twice backplane_heartbeat")
        if not self.state_interval > 0:  # also refuses NaN
            found.append("state_interval: must be more than 0 seconds")
        for n, grant in enumerate(self.tokens):
            if problem := hash_problem(grant.token):
                found.append(f"tokens[{n}] ({grant.name or 'unnamed'}): {problem}")
        for n, viewer in enumerate(self.viewer_tokens):
            if problem := viewer.problem():
                found.append(f"viewer_tokens[{n}] ({viewer.name or 'unnamed'}): {problem}")
        if self.status_access not in STATUS_ACCESS:
            found.append(f"status_access: expected one of {', '.join(STATUS_ACCESS)}")
        if self.status_access == "token" and not self.status_token:
            found.append('status_access = "token" needs a status_token (or MT5HUB_STATUS_TOKEN)')
        if problem := hash_problem(self.status_token):
            found.append(f"status_token: {problem}")
        if not self.viewer_lag >= 0:  # also refuses NaN
            found.append("viewer_lag: must be 0 seconds or more (inf: no flow control)")
        if not 0 <= self.viewer_lag_interval < math.inf:
            found.append("viewer_lag_interval: must be 0 seconds or more, and finite")
        if not (self.byte_rate > 0 and self.failed_handshake_window > 0):  # also refuses NaN
            found.append("byte_rate and failed_handshake_window: must be more than 0")
        for name in (
            "max_viewers",
            "max_viewers_per_ip",
            "max_publishers",
            "byte_burst",
            "max_tables",
            "max_table_bytes",
            "max_state_bytes",
            "max_head_bytes",
            "max_headers",
            "failed_handshakes",
        ):
            if getattr(self, name) < 1:
                found.append(f"{name}: must be at least 1")
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                found.append(f"trusted_proxies: {network!r} is not an address or network")
        return found


HTTP11 = "http/1.1"
HYPERCORN_ALPN = ("h2", HTTP11)  # what Hypercorn offers on TLS binds unless told otherwise


@attrs.frozen
class HubConfig:
    settings: Settings = Settings()
    binds: tuple[str, ...] = ()
    max_frame_bytes: int = 1024 * 1024
    workers: int = 1
    source: str = "<defaults>"
    tls_binds: tuple[str, ...] = ()  # `bind` when certfile is set: Hypercorn serves TLS there
    alpn_protocols: tuple[str, ...] = HYPERCORN_ALPN  # what those binds offer browsers


_converter = cattrs.Converter(forbid_extra_keys=True)
_viewer_table = make_dict_structure_fn(ViewerGrant, _converter, _cattrs_forbid_extra_keys=True)


def _structure_viewer(value: Any, _: type) -> ViewerGrant:
    """A `viewer_tokens` entry: a string (a token that sees every table) or a table."""
    if isinstance(value, str):
        value = {"token": value}
    if not isinstance(value, Mapping):
        raise ValueError("expected a token string or a table {token, keys, name}")
    return _viewer_table(value, ViewerGrant)


_converter.register_structure_hook(ViewerGrant, _structure_viewer)


def _parse_tokens_env(value: str, variable: str = "MT5HUB_TOKENS") -> list[dict[str, Any]]:
    """`MT5HUB_TOKENS="tokA,sha256:<hex>:EA1|EA2"`: comma-separated tokens (plain or hashed),
    each maybe limited to keys. MT5HUB_VIEWER_TOKENS has the same syntax."""
    grants: list[dict[str, Any]] = []
    for n, entry in enumerate(filter(None, (e.strip() for e in value.split(","))), 1):
        prefix = HASHED if entry.startswith(HASHED) else ""
        token, _, keys = entry.removeprefix(prefix).partition(":")
        token = prefix + token
        grants.append(
            {"token": token, "keys": keys.split("|") if keys else [ANY_KEY], "name": f"env#{n}"}
        )
    if not grants:
        raise ConfigError(f"{variable} is set but holds no token")
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
        viewers = environ["MT5HUB_VIEWER_TOKENS"]
        empty = not viewers.replace(",", "").strip()  # set but empty: no viewer tokens
        table["viewer_tokens"] = [] if empty else _parse_tokens_env(viewers, "MT5HUB_VIEWER_TOKENS")
    if "MT5HUB_STATUS_TOKEN" in environ:
        table["status_token"] = environ["MT5HUB_STATUS_TOKEN"].strip()
    try:
        settings = _converter.structure(table, Settings)
    except cattrs.BaseValidationError as exc:
        problems = "; ".join(cattrs.transform_error(exc, path="mt5hub"))
        raise ConfigError(f"{file}: {problems}") from exc
    if wrong := settings.problems():
        raise ConfigError(f"{file}: [mt5hub] " + "; ".join(wrong))
    bind = tuple(_as_list(raw.get("bind", ["127.0.0.1:8000"])))
    return HubConfig(
        settings=settings,
        binds=bind + tuple(_as_list(raw.get("insecure_bind", []))),
        max_frame_bytes=int(raw.get("websocket_max_message_size", 1024 * 1024)),
        workers=int(raw.get("workers", 1)),
        source=str(file),
        tls_binds=bind if raw.get("certfile") and raw.get("keyfile") else (),
        alpn_protocols=tuple(_as_list(raw.get("alpn_protocols", list(HYPERCORN_ALPN)))),
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


def status_access(config: HubConfig) -> str:
    """`status_access` with "auto" decided: "any" when every bind is loopback (nothing but this
    machine, or a proxy on it that decides, reaches the hub), else "private"."""
    access = config.settings.status_access
    if access != "auto":
        return access
    return "any" if all(is_loopback_bind(b) for b in config.binds) else "private"


def check_safe_to_serve(config: HubConfig) -> None:
    """Refuse what would serve unsafely or not as designed: the seed's well-known token anywhere
    but loopback (it is printed in every README), HTTP/2 offered on a TLS bind, several workers
    without a backplane."""
    public = [b for b in config.binds if not is_loopback_bind(b)]
    well_known = token_digest(DEFAULT_TOKEN)  # refused hashed, too
    default = [g for g in config.settings.tokens if configured_digest(g.token) == well_known]
    if public and default:
        raise ConfigError(
            f"refusing to start: the default publisher token is enabled and the hub binds "
            f"{', '.join(public)}, which is not loopback. Set your own tokens in [mt5hub] of "
            f"{config.source} or in MT5HUB_TOKENS (`mt5hub token new` makes one)."
        )
    if not config.settings.tokens:
        raise ConfigError(f"{config.source}: no publisher token configured")
    if config.tls_binds and config.alpn_protocols != (HTTP11,):
        offered = ", ".join(f'"{p}"' for p in config.alpn_protocols)
        raise ConfigError(
            f"refusing to start: the TLS bind {', '.join(config.tls_binds)} would offer "
            f"[{offered}] by ALPN, and browsers would open their WebSockets as HTTP/2 streams, "
            f"which the hub does not serve (docs/decisions/006-http11-only-on-tls.md). Set "
            f'alpn_protocols = ["{HTTP11}"] in {config.source}.'
        )
    if config.workers > 1 and not config.settings.backplane:
        raise ConfigError(
            f"refusing to start: workers = {config.workers} in {config.source}, but each worker "
            f'would hold its own tables and viewers. Set backplane = "redis://..." in '
            f"[mt5hub] (or MT5HUB_BACKPLANE), or workers = 1."
        )
