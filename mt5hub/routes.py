"""The Quart-Trio app: HTTP routes, and the two WebSocket routes that hand over to sessions.

Everything a route does beyond the handshake lives in `session` and `hub`; this module only
authenticates, adapts the websocket, and reports.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import ssl
import time
import tomllib
from pathlib import Path
from typing import Any

import trio
from quart import Response, Websocket, jsonify, request, send_from_directory, websocket
from quart_trio import QuartTrio

from . import persist
from .auth import Authenticator, Refusal, StatusAccess, bearer_token
from .backplane import RedisBackplane
from .config import HubConfig, check_safe_to_serve, load_config, status_access
from .errors import ProtocolError
from .hub import Backplane, Hub, LocalBackplane
from .limits import (
    RETRY_AFTER,
    FailedHandshakes,
    Limits,
    LogThrottle,
    address_key,
    client_ip,
    raise_open_files_limit,
)
from .memory import Trimmer
from .metrics import CONTENT_TYPE
from .models import Decoder
from .persist import StateStore
from .publisher import PublisherSession
from .server import QuartTransport, TrackConnections, follow_parent, refuse_to_start
from .server import install as install_adapter
from .state import encode
from .subscription import Subscription, query_selectors
from .supervise import Supervisor
from .viewer import ViewerSession

log = logging.getLogger("mt5hub")
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def certificate_fingerprint(config_source: str) -> str | None:
    """SHA-256 of the WSS certificate (`certfile` of hub.toml, DER), as an EA pins it: "AB:CD:...".

    None without a certificate. Hypercorn reads certfile relative to the working directory.
    """
    try:
        certfile = tomllib.loads(Path(config_source).read_text(encoding="utf-8"))["certfile"]
        pem = Path(certfile).read_text(encoding="ascii")
        end = pem.index(ssl.PEM_FOOTER) + len(ssl.PEM_FOOTER)  # the first of a chain: the hub's
        der = ssl.PEM_cert_to_DER_cert(pem[pem.index(ssl.PEM_HEADER) : end])
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        return None
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _refuse(refusal: Refusal, reason: str, hub: Hub, ip: str, throttle: LogThrottle) -> Response:
    """An HTTP answer instead of the upgrade: the client sees 401/403/429/503, not a WebSocket."""
    hub.metrics.rejects.labels(reason).inc()
    throttle.warning(
        reason,
        ip,
        "refused %s from %s: %s %s",
        websocket.path,
        ip,
        refusal.status,
        refusal.detail,
    )
    response = Response(
        encode({"error": reason, "detail": refusal.detail}),
        status=refusal.status,
        content_type="application/json",
    )
    if refusal.status in (429, 503):
        response.headers["Retry-After"] = str(refusal.retry_after or RETRY_AFTER)
    return response


def _setup_logging(level: str) -> None:
    """The hub's own lines to stderr; Hypercorn's loggers keep their own handlers (no doubles)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s mt5hub: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


# RFC 8441 lets a client open a WebSocket as an HTTP/2 stream (h2c on the plain bind; TLS binds
# offer only HTTP/1.1, see check_safe_to_serve). The hub's fan-out, flow control and hardening
# are built on HTTP/1.1 sockets (docs/decisions/006-http11-only-on-tls.md): such a stream is
# refused.
_HTTP2_WEBSOCKET = Refusal(505, "WebSockets are served over HTTP/1.1 only (RFC 6455), not HTTP/2")


DELTA = "mt5hub.v1.1"  # the WebSocket subprotocol of a viewer that asks for patches


def _token() -> str | None:
    return bearer_token(websocket.headers.get("Authorization"), websocket.args.get("token"))


def _current_websocket() -> Websocket:
    """The websocket behind Quart's context-local proxy, to hand to a session."""
    return websocket._get_current_object()  # type: ignore[attr-defined,no-any-return]


def create_app(config: HubConfig | None = None) -> QuartTrio:
    config = config or load_config()
    settings = config.settings
    app = QuartTrio(__name__, static_folder=str(TEMPLATES / "static"), static_url_path="/static")
    app.asgi_app = TrackConnections(app.asgi_app)  # type: ignore[method-assign,assignment]
    backplane: Backplane = LocalBackplane()
    if settings.backplane:
        backplane = RedisBackplane(
            settings.backplane,
            prefix=settings.backplane_prefix,
            heartbeat=settings.backplane_heartbeat,
            ttl=settings.backplane_ttl,
            timeout=settings.backplane_timeout,
        )
    hub = Hub(
        viewer_buffer=settings.viewer_buffer,
        backplane=backplane,
        max_tables=settings.max_tables,
        max_table_bytes=settings.max_table_bytes,
        max_state_bytes=settings.max_state_bytes,
    )
    # With a backplane the state lives in Redis: workers sharing one file would fight over it.
    store = (
        StateStore(settings.state_file, interval=settings.state_interval)
        if settings.state_file and not settings.backplane
        else None
    )
    auth = Authenticator(settings.tokens, settings.viewer_tokens, settings.allowed_origins)
    status = StatusAccess(status_access(config), settings.status_token)
    decoder = Decoder(settings.max_rows)
    limits = Limits(
        max_viewers=settings.max_viewers,
        max_viewers_per_ip=settings.max_viewers_per_ip,
        max_publishers=settings.max_publishers,
    )
    throttle = LogThrottle()
    failures = FailedHandshakes(settings.failed_handshakes, settings.failed_handshake_window)

    def refuse_auth(refusal: Refusal, reason: str, ip: str) -> Response:
        """401/403, counted against the address's budget of failed handshakes."""
        failures.failed(ip)
        return _refuse(refusal, reason, hub, ip, throttle)

    def peer_ip() -> str:
        return client_ip(
            str(websocket.remote_addr),
            websocket.headers.get("X-Forwarded-For"),
            settings.trusted_proxies,
        )

    started = time.monotonic()
    app.extensions["mt5hub"] = hub
    # Background tasks run under it: their errors never end the lifespan (see supervise.py).
    supervisor = Supervisor(hub.metrics)

    @app.before_serving
    async def startup() -> None:
        _setup_logging(settings.log_level)
        follow_parent()
        try:
            await serve()
        except Exception as exc:
            refuse_to_start(str(exc))  # Hypercorn's exit status must say so (hardening.py, 7)
            raise

    async def serve() -> None:
        check_safe_to_serve(config)  # raising here makes Hypercorn exit with the reason
        # mt5hub/server: the Hypercorn adapter (fast paths, and the holes hostile clients reach
        # closed and counted), in place before the first connection is accepted.
        app.extensions["mt5hub.server"] = install_adapter(
            lambda role, code: hub.metrics.closes.labels(role, str(code)).inc(),
            config.max_frame_bytes,
            settings.asgi_only,
            max_head_bytes=settings.max_head_bytes,
            max_headers=settings.max_headers,
            on_reject=lambda reason: hub.metrics.rejects.labels(reason).inc(),
        )
        wanted = settings.max_viewers + settings.max_publishers + 256  # + files, Redis, slack
        soft, hard = raise_open_files_limit(wanted)
        if soft < wanted:
            log.warning(
                "open files limit is %s (hard %s), under the %s that max_viewers and "
                "max_publishers may need: raise it (LimitNOFILE= in systemd, ulimit -n)",
                soft,
                hard,
                wanted,
            )
        if store is not None:
            # Before serving, so the first viewer's snapshot holds the tables of the last run.
            persist.restore(hub, await trio.to_thread.run_sync(store.load))
            # Cancelled at shutdown, before final_save.
            app.nursery.start_soon(supervisor.run, "state saver", functools.partial(store.run, hub))
        elif settings.state_file and settings.backplane:
            log.info("state_file unused: with a backplane the latest state lives in Redis")
        if settings.trim_memory:
            trimmer = functools.partial(Trimmer().run, hub)
            app.nursery.start_soon(supervisor.run, "memory trim", trimmer)
        if isinstance(backplane, RedisBackplane):
            # Lives in the lifespan nursery, cancelled at shutdown. Returns once the first
            # attempt to reach Redis is over, so the first viewer gets the shared snapshot.
            runner = functools.partial(backplane.run, hub)
            await app.nursery.start(supervisor.run, "backplane", runner)
        log.info("mt5hub serving, config %s, binds %s", config.source, ", ".join(config.binds))
        if fingerprint := certificate_fingerprint(config.source):
            log.info("WSS certificate SHA-256 fingerprint (an EA may pin it): %s", fingerprint)

    @app.after_serving
    async def save_state() -> None:
        """Every connection is closed by now: write what the last interval did not (bounded)."""
        if store is not None:
            await store.final_save(hub)

    @app.get("/")
    async def index() -> Any:
        return await send_from_directory(TEMPLATES, "index.html")

    def status_refusal() -> Response | None:
        """401/403 for a client that may not read /healthz or /metrics (status_access)."""
        peer = request.remote_addr or ""  # none on a unix socket
        forwarded = request.headers.get("X-Forwarded-For")
        ip = client_ip(peer, forwarded, settings.trusted_proxies)
        token = bearer_token(request.headers.get("Authorization"), request.args.get("token"))
        refusal = status.check(token, ip, untrusted_proxy=bool(forwarded) and ip == peer)
        if refusal is None:
            return None
        reason = "status_forbidden" if refusal.status == 403 else "status_unauthorized"
        line = "refused GET %s from %s: %s %s"
        throttle.warning(reason, ip, line, request.path, ip, refusal.status, refusal.detail)
        body = encode({"error": reason.removeprefix("status_"), "detail": refusal.detail})
        headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
        return Response(body, refusal.status, headers, content_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Any:
        if (refused := status_refusal()) is not None:
            return refused
        bp = hub.backplane.status()
        failing = dict(supervisor.failing)  # background tasks failing now, and their last error
        if store is not None and store.problem:  # saves failing with OSError (disk full, say)
            failing.setdefault("state saver", store.problem)
        return jsonify(
            status="ok" if bp["connected"] and not failing else "degraded",
            failing=failing,
            backplane=bp,
            server=app.extensions.get("mt5hub.server", "starting"),
            publishers=hub.publishers,
            viewers=len(hub.viewers),
            tables=len(hub.tables),
            pid=os.getpid(),
            rss_bytes=_rss_bytes(),
            uptime_s=round(time.monotonic() - started, 1),
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        if (refused := status_refusal()) is not None:
            return refused
        return Response(hub.metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/ws")
    @app.get("/ws/dll")
    async def not_a_websocket() -> Response:
        """A plain GET (a browser, a curl, a health check pointed at the wrong path)."""
        peer = request.remote_addr
        log.info("refused GET %s from %s: 426 not a WebSocket handshake", request.path, peer)
        body = {"error": "upgrade_required", "detail": "a WebSocket endpoint: use ws:// or wss://"}
        headers = {"Upgrade": "websocket"}
        return Response(encode(body), 426, headers, content_type="application/json")

    @app.websocket("/ws/dll")
    async def publisher() -> Response | None:
        ip = peer_ip()
        if websocket.http_version != "1.1":
            return _refuse(_HTTP2_WEBSOCKET, "http_version", hub, ip, throttle)
        if (spent := failures.refusal(ip)) is not None:
            return _refuse(spent, "too_many_failures", hub, address_key(ip), throttle)
        grant = auth.publisher(_token())
        if isinstance(grant, Refusal):
            return refuse_auth(grant, "unauthorized", ip)
        with limits.publisher() as full:
            if full is not None:
                return _refuse(full, "hub_full", hub, ip, throttle)
            await websocket.accept()
            peer = f"{ip} ({grant.name or 'token'})"
            transport = QuartTransport(_current_websocket(), hub.metrics)
            await PublisherSession(
                hub, transport, settings, peer, grant, decoder, config.max_frame_bytes
            ).run()
        return None

    @app.websocket("/ws")
    async def viewer() -> Response | None:
        ip = peer_ip()
        if websocket.http_version != "1.1":
            return _refuse(_HTTP2_WEBSOCKET, "http_version", hub, ip, throttle)
        if (spent := failures.refusal(ip)) is not None:
            return _refuse(spent, "too_many_failures", hub, address_key(ip), throttle)
        grant = auth.viewer(
            _token(),
            websocket.headers.get("Origin"),
            websocket.headers.get("Host"),
        )
        if isinstance(grant, Refusal):
            reason = "forbidden" if grant.status == 403 else "unauthorized"
            return refuse_auth(grant, reason, ip)
        try:
            asked = query_selectors(websocket.args.get("keys"), websocket.args.get("src"))
        except ProtocolError as exc:
            return _refuse(Refusal(400, exc.detail), "bad_subscription", hub, ip, throttle)
        subscription, refused = Subscription.at_connect(grant, asked)
        protocol = DELTA if DELTA in websocket.requested_subprotocols else None
        delta = protocol is not None or websocket.args.get("delta") in ("1", "true")
        with limits.viewer(ip) as full:
            if full is not None:
                reason = "too_many_from_ip" if full.status == 429 else "hub_full"
                return _refuse(full, reason, hub, ip, throttle)
            await websocket.accept(subprotocol=protocol)
            transport = QuartTransport(_current_websocket(), hub.metrics)
            transport.limit_send_buffer(settings.viewer_send_buffer)
            session = ViewerSession(hub, transport, settings, ip, subscription, delta, refused)
            await session.run()
        return None

    return app
