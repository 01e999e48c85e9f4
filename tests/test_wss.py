"""WSS is the same path as WS: the hub's TLS binds offer HTTP/1.1 only, so browsers open their
WebSockets with an RFC 6455 upgrade, never as HTTP/2 streams (RFC 8441), which the hub refuses.

See docs/decisions/006-http11-only-on-tls.md. The fan-out, flow control and hardening over TLS are
shown by the `wss` cases of tests/test_hub_server.py and tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trustme
from conftest import TOKEN, RunningHub, free_port, write_hub_files

from mt5hub.config import check_safe_to_serve, load_config
from mt5hub.errors import ConfigError

DEADLINE = 60.0


async def test_the_tls_bind_offers_only_http11_to_a_client_that_prefers_h2(
    hub: RunningHub,
) -> None:
    context = hub.client_ssl_context()
    context.set_alpn_protocols(["h2", "http/1.1"])  # what every browser offers
    with trio.fail_after(DEADLINE):
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", hub.https_port, ssl_context=context, https_compatible=True
        )
        async with stream:
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == "http/1.1"


async def _http2_websocket(port: int, path: str, headers: list[tuple[str, str]]) -> int:
    """Open a WebSocket as an HTTP/2 stream (RFC 8441, extended CONNECT) over h2c with prior
    knowledge, as a client may on the plain bind; the status of the hub's answer."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(conn.data_to_send())
            sent = False
            while True:
                data = await stream.receive_some(65536)
                assert data, "the hub closed the HTTP/2 connection without an answer"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        return int(dict(event.headers)[b":status"])
                if not sent and conn.remote_settings.enable_connect_protocol:
                    request = [
                        (":method", "CONNECT"),
                        (":protocol", "websocket"),
                        (":scheme", "http"),
                        (":path", path),
                        (":authority", f"127.0.0.1:{port}"),
                        ("sec-websocket-version", "13"),
                        *headers,
                    ]
                    conn.send_headers(1, request)
                    sent = True
                await stream.send_all(conn.data_to_send())


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/ws", []), ("/ws/dll", [("authorization", f"Bearer {TOKEN}")])],
    ids=["viewer", "publisher"],
)
async def test_a_websocket_over_http2_is_refused_with_505_and_one_log_line(
    hub: RunningHub, path: str, headers: list[tuple[str, str]]
) -> None:
    assert await _http2_websocket(hub.http_port, path, headers) == 505
    lines = [line for line in hub.log().splitlines() if "505" in line and "HTTP/1.1 only" in line]
    assert len(lines) == 1, hub.log()
    assert f"refused {path} from 127.0.0.1" in lines[0]
    health = json.loads(hub.get("/healthz")[1])
    assert health["viewers"] == 0 and health["publishers"] == 0


def _tls_hub_toml(tmp_path: Path, ca: trustme.CA, **settings: Any) -> Path:
    write_hub_files(tmp_path, ca, free_port(), free_port(), settings)
    return tmp_path / "hub.toml"


def test_a_tls_bind_offering_http2_refuses_to_start_and_says_how_to_fix_it(
    tmp_path: Path, ca: trustme.CA
) -> None:
    path = _tls_hub_toml(tmp_path, ca, alpn_protocols=["h2", "http/1.1"])
    with pytest.raises(ConfigError, match=r'alpn_protocols = \["http/1.1"\]'):
        check_safe_to_serve(load_config(path, environ={}))
    # Left out, Hypercorn offers h2 too: refused the same way.
    path.write_text("".join(line for line in path.open() if not line.startswith("alpn")))
    with pytest.raises(ConfigError, match="HTTP/2"):
        check_safe_to_serve(load_config(path, environ={}))


def test_a_tls_bind_offering_http2_stops_the_real_hub_with_the_reason(
    tmp_path: Path, ca: trustme.CA
) -> None:
    hub = RunningHub(tmp_path, free_port(), free_port(), ca)
    write_hub_files(tmp_path, ca, hub.http_port, hub.https_port, {"alpn_protocols": ["h2"]})
    try:
        with pytest.raises(RuntimeError, match="hub exited"):
            hub.start(timeout=DEADLINE)
    finally:
        hub.kill()
    assert 'alpn_protocols = ["http/1.1"]' in hub.log()


def test_plain_binds_alone_need_no_alpn_setting(tmp_path: Path) -> None:
    (tmp_path / "hub.toml").write_text('bind = ["127.0.0.1:8000"]\n')
    check_safe_to_serve(load_config(tmp_path / "hub.toml", environ={}))


def test_the_shipped_hub_toml_offers_http11_only() -> None:
    config = load_config(Path(__file__).resolve().parent.parent / "hub.toml", environ={})
    assert config.tls_binds and config.alpn_protocols == ("http/1.1",)
    check_safe_to_serve(config)
