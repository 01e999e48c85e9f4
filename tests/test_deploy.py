"""The production examples in deploy/ run for real.

NGINX and Caddy: each committed example is turned into a runnable config by replacing a few
placeholders (domain, Let's Encrypt paths, ports) with a trustme certificate and free loopback
ports; every replaced value must still be in the example, so the tests follow it. The proxy then
runs in front of a real hub (conftest's `hub_factory`), and a publisher and a dashboard talk to the
hub through it over TLS. `/metrics` is asked from 127.0.0.2, a loopback address outside the allowed
networks, to prove the restriction. systemd: `systemd-analyze verify` and `security --offline`
on the unit with its paths and user made real on this machine.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from conftest import ROOT, RunningHub, free_port, require_tool
from helpers import publish_frame, publisher, receive, table_rows, viewer
from playwright.sync_api import expect
from trio_websocket import ConnectionRejected, open_websocket_url

DEPLOY = ROOT / "deploy"
DEADLINE = 60.0
PLACEHOLDER_HOST = "hub.example.com"


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each placeholder, which must be in the example (else the example changed)."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the example: update tests/test_deploy.py"
        text = text.replace(old, new)
    return text


def tool(name: str, why: str) -> str:
    return require_tool(shutil.which(name) or f"/usr/sbin/{name}", why)


@attrs.define
class Proxy:
    """A reverse proxy process in front of `hub`, serving TLS on 127.0.0.1:`port`."""

    hub: RunningHub
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def wss_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return self.hub.client_ssl_context()  # the proxy's certificate is from the same CA

    def log(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.folder.glob("*.log")
        )

    def get(self, path: str, source: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
        """One HTTPS request from `source` (any 127.x address reaches a loopback listener)."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.ssl_context(), timeout=10,
            source_address=(source, 0),
        )  # fmt: skip
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode()
        finally:
            conn.close()


@contextlib.contextmanager
def running(command: list[str], proxy: Proxy, env: dict[str, str] | None = None) -> Iterator[Proxy]:
    """Run the proxy until it serves TLS; always stop it (and anything it spawned) afterwards."""
    log = open(proxy.folder / "stdout.log", "ab")  # noqa: SIM115 - the process owns it
    proxy.process = process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    log.close()
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            assert process.poll() is None, f"proxy exited {process.returncode}:\n{proxy.log()}"
            try:
                status, _, _ = proxy.get("/healthz")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"proxy never served /healthz:\n{proxy.log()}"
            with contextlib.suppress(subprocess.TimeoutExpired):  # not yet: wait on it a moment
                process.wait(0.1)
        yield proxy
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers of a proxy that did not stop
        process.wait()


def issue_cert(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = folder / "proxy.crt", folder / "proxy.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


# -- NGINX -------------------------------------------------------------------------------------


def nginx_config(folder: Path, cert: Path, key: Path, port: int, upstream: int) -> Path:
    """deploy/nginx.conf on free loopback ports, inside a main config that keeps all in `folder`."""
    example = (DEPLOY / "nginx.conf").read_text()
    site = substitute(
        example,
        {
            "listen 80;": f"listen 127.0.0.1:{free_port()};",
            "listen [::]:80;\n": "",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
            "listen [::]:443 ssl http2;\n": "",
            f"/etc/letsencrypt/live/{PLACEHOLDER_HOST}/fullchain.pem": str(cert),
            f"/etc/letsencrypt/live/{PLACEHOLDER_HOST}/privkey.pem": str(key),
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream};",
        },
    )
    (folder / "mt5hub-site.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = f"""\
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} info;
events {{ worker_connections 1024; }}
http {{
    access_log {folder / "access.log"};
    proxy_max_temp_file_size 0;  # root's workers run as nobody: no temp files in tmp_path
{temp}
    include {folder / "mt5hub-site.conf"};
}}
"""
    conf = folder / "nginx.conf"
    conf.write_text(main)
    return conf


def nginx_command(nginx: str, folder: Path, conf: Path, *args: str) -> list[str]:
    return [nginx, "-p", f"{folder}/", "-e", str(folder / "error.log"), "-c", str(conf), *args]


@pytest.fixture
def nginx_front(
    hub_factory: Callable[..., RunningHub], tmp_path: Path, ca: trustme.CA
) -> Iterator[Proxy]:
    nginx = tool("nginx", "the deploy/nginx.conf example")
    hub = hub_factory(accesslog="-")  # to see what reached the hub
    proxy = Proxy(hub, free_port(), tmp_path)
    conf = nginx_config(tmp_path, *issue_cert(ca, tmp_path), proxy.port, hub.http_port)
    checked = subprocess.run(
        nginx_command(nginx, tmp_path, conf, "-t"), capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    with running(nginx_command(nginx, tmp_path, conf, "-g", "daemon off;"), proxy):
        yield proxy


def test_nginx_example_restricts_metrics_and_keeps_websockets_open() -> None:
    """What the running test cannot wait for: timeouts above the hub's 30 s, and the allow list."""
    text = (DEPLOY / "nginx.conf").read_text()
    metrics = text.split("location = /metrics {", 1)[1].split("}", 1)[0]
    assert "allow 127.0.0.1;" in metrics and "deny all;" in metrics
    ws = text.split("location /ws {", 1)[1].split("}", 1)[0]
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = int(ws.split(directive, 1)[1].split(";", 1)[0].strip().rstrip("s"))
        assert seconds > 30
    assert "proxy_buffering off;" in ws
    assert "proxy_set_header Host $http_host;" in text


async def test_nginx_proxies_the_hub_over_tls(nginx_front: Proxy) -> None:
    await proxied_hub_works(nginx_front)


# -- Caddy -------------------------------------------------------------------------------------


def caddy_config(folder: Path, cert: Path, key: Path, port: int, upstream: int) -> Path:
    """deploy/Caddyfile with a local certificate instead of ACME, nothing reaching the network."""
    example = (DEPLOY / "Caddyfile").read_text()
    text = substitute(
        example,
        {
            "email admin@example.com": (
                f"admin off\n\tauto_https off\n\thttp_port {free_port()}\n\thttps_port {port}"
            ),
            f"{PLACEHOLDER_HOST} {{": f"https://127.0.0.1:{port} {{\n\ttls {cert} {key}",
            "reverse_proxy 127.0.0.1:8000 {": f"reverse_proxy 127.0.0.1:{upstream} {{",
        },
    )
    path = folder / "Caddyfile"
    path.write_text(text)
    return path


def caddy_env(folder: Path) -> dict[str, str]:
    """Caddy's data and config folders (certificates, autosave) in `folder`, not in ~."""
    return {
        **os.environ,
        "HOME": str(folder),
        "XDG_DATA_HOME": str(folder / "data"),
        "XDG_CONFIG_HOME": str(folder / "config"),
    }


def test_caddy_example_validates_as_committed(tmp_path: Path) -> None:
    """The committed Caddyfile as is (validation obtains no certificate)."""
    caddy = tool("caddy", "the deploy/Caddyfile example")
    checked = subprocess.run(
        [caddy, "validate", "--config", str(DEPLOY / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60, env=caddy_env(tmp_path),
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "Valid configuration" in checked.stdout + checked.stderr


@pytest.fixture
def caddy_front(
    hub_factory: Callable[..., RunningHub], tmp_path: Path, ca: trustme.CA
) -> Iterator[Proxy]:
    caddy = tool("caddy", "the deploy/Caddyfile example")
    hub = hub_factory(accesslog="-")  # to see what reached the hub
    proxy = Proxy(hub, free_port(), tmp_path)
    config = caddy_config(tmp_path, *issue_cert(ca, tmp_path), proxy.port, hub.http_port)
    env = caddy_env(tmp_path)
    args = ["--config", str(config), "--adapter", "caddyfile"]
    checked = subprocess.run(
        [caddy, "validate", *args], capture_output=True, text=True, timeout=60, env=env
    )
    assert checked.returncode == 0, checked.stderr
    with running([caddy, "run", *args], proxy, env=env):
        yield proxy


async def test_caddy_proxies_the_hub_over_tls(caddy_front: Proxy) -> None:
    await proxied_hub_works(caddy_front)


# -- what both proxies must do -----------------------------------------------------------------


async def proxied_hub_works(proxy: Proxy) -> None:
    """HTTP routes, /metrics restricted, and both WebSockets through the proxy over TLS."""
    status, _, body = await trio.to_thread.run_sync(proxy.get, "/healthz")
    assert status == 200 and isinstance(json.loads(body), dict)
    status, _, body = await trio.to_thread.run_sync(proxy.get, "/")
    assert status == 200 and "<html" in body.lower()
    status, _, _ = await trio.to_thread.run_sync(proxy.get, "/static/dashboard.js")
    assert status == 200
    status, _, body = await trio.to_thread.run_sync(proxy.get, "/metrics")
    assert status == 200 and "# TYPE" in body
    status, _, body = await trio.to_thread.run_sync(proxy.get, "/metrics", "127.0.0.2")
    assert status == 403 and "# TYPE" not in body

    # A dashboard served by the proxy: its Origin names the proxy's host and port, and the hub,
    # seeing the Host the browser sent, accepts it; a page from elsewhere is refused.
    ssl_context = proxy.ssl_context()
    same_origin = [("Origin", proxy.https_url)]
    with trio.fail_after(DEADLINE), pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(
            proxy.wss_url + "/ws",
            ssl_context=ssl_context,
            extra_headers=[("Origin", "https://evil.example.net")],
        ):
            pass
    assert refused.value.status_code == 403

    async with viewer(proxy.wss_url, ssl_context, headers=same_origin) as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        assert snapshot["tables"] == []
        async with publisher(proxy.wss_url, ssl_context=ssl_context) as pub:
            await pub.send_message(publish_frame(key="EA1", src="S1", value=7))
            while True:
                update = await receive(view, "update", timeout=DEADLINE)
                if update["key"] == "EA1":
                    break
            assert (update["src"], update["data"]) == ("S1", table_rows(value=7))
            # and the publisher's own channel works both ways through the proxy
            await pub.send_message('{"type":"ping"}')
            await receive(pub, "pong", timeout=DEADLINE)


@pytest.mark.parametrize("front", ["nginx_front", "caddy_front"])
def test_a_browser_gets_http2_from_the_proxy_and_the_hub_gets_http11_websockets(
    front: str, request: pytest.FixtureRequest, new_page: Callable[..., Any]
) -> None:
    """Chromium, trusting the proxy's certificate, loads the dashboard over HTTP/2; its WebSocket
    reaches the hub as an HTTP/1.1 upgrade, the path the hub serves (never an HTTP/2 stream)."""
    proxy: Proxy = request.getfixturevalue(front)
    page = new_page()
    page.goto(proxy.https_url)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    assert page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol") == "h2"

    async def publish() -> None:
        async with publisher(proxy.wss_url, ssl_context=proxy.ssl_context()) as pub:
            await pub.send_message(publish_frame(key="EA1", src="S1", value=7))
            await pub.send_message('{"type":"ping"}')
            await receive(pub, "pong", timeout=DEADLINE)

    trio.run(publish)
    expect(page.locator('section.panel[data-key="EA1"][data-src="S1"]')).to_be_visible()
    log = proxy.hub.log()
    assert '"GET /ws 1.1" 101' in log and '"GET /ws 2' not in log, log[-3000:]


# -- systemd -----------------------------------------------------------------------------------


def real_unit(folder: Path) -> Path:
    """deploy/mt5hub.service with paths and user that exist here; the rest as committed."""
    user = pwd.getpwuid(os.getuid())
    workdir = folder / "opt-mt5hub"
    workdir.mkdir()
    (workdir / "hub.toml").write_text("")
    env_file = folder / "mt5hub.env"
    env_file.write_text("MT5HUB_TOKENS=example\n")
    hypercorn = Path(sys.executable).parent / "hypercorn"
    assert os.access(hypercorn, os.X_OK), hypercorn
    text = substitute(
        (DEPLOY / "mt5hub.service").read_text(),
        {
            "ExecStart=/opt/mt5hub/.venv/bin/hypercorn ": f"ExecStart={hypercorn} ",
            "WorkingDirectory=/opt/mt5hub\n": f"WorkingDirectory={workdir}\n",
            "EnvironmentFile=/etc/mt5hub/mt5hub.env": f"EnvironmentFile={env_file}",
            "User=mt5hub\n": f"User={user.pw_name}\n",
            "Group=mt5hub\n": f"Group={grp.getgrgid(user.pw_gid).gr_name}\n",
        },
    )
    unit = folder / "mt5hub.service"
    unit.write_text(text)
    return unit


def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "checking deploy/mt5hub.service")
    unit = real_unit(tmp_path)
    checked = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert "mt5hub.service" not in output, output  # no warning names the unit

    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=30", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert security.returncode == 0, security.stdout + security.stderr
    assert "Overall exposure level for mt5hub.service" in security.stdout


def test_systemd_unit_restarts_always_and_stops_gracefully() -> None:
    """The choices systemd cannot check: restart even after exit 0, stop after the hub's drain."""
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "mt5hub.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["Restart"] == ["always"]
    assert settings["KillSignal"] == ["SIGTERM"] and settings["KillMode"] == ["mixed"]
    hub_toml = (ROOT / "hub.toml").read_text()
    graceful = float(hub_toml.split("graceful_timeout =", 1)[1].split()[0])
    assert float(settings["TimeoutStopSec"][0]) > graceful
    assert int(settings["LimitNOFILE"][0]) >= 65536
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert settings[key] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ExecStart"][0].endswith("hypercorn --config hub.toml mt5hub:app")
