"""Fixtures that start a real hub (Hypercorn in a subprocess, WS and WSS at once) on free ports.

`hub_factory(**settings)` writes a hub.toml with those `[mt5hub]` settings into a temporary folder,
with a certificate from a trustme CA, and starts `hypercorn --config hub.toml mt5hub:app`, exactly
as the README does (through `mt5hub.testing.launcher`, which the scripts and benches use too).
Tests then talk to it over real sockets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trustme

from mt5hub.testing.launcher import HubProcess, free_port, hub_toml, kill_group, spawn
from mt5hub.testing.tw_workaround import pong_unless_closing

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-publisher-token"
EA1_ONLY_TOKEN = "token-for-ea1-only"
IN_CI = os.environ.get("CI") == "true"
pytest_plugins = ["browser"]  # tests/browser.py: Chromium, trusting the tests' CA
MT5HUB = Path(sys.executable).with_name("mt5hub")  # the console script: token, check-config, ...


pong_unless_closing()  # the hub pings viewers while they close: python-trio/trio-websocket#184


def require_tool(path: str, why: str) -> str:
    """Find a system tool; a missing one skips locally but fails in CI (which must install it)."""
    found = shutil.which(path) or (path if os.path.exists(path) else None)
    if found is None:
        message = f"{path} is missing ({why}); .ci/run installs it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


# Keys of hub_factory(**settings) that are Hypercorn's (top level of hub.toml), not [mt5hub]'s.
HYPERCORN_KEYS = (
    "keep_alive_timeout",
    "ssl_handshake_timeout",
    "backlog",
    "read_timeout",
    "accesslog",
)


class RunningHub(HubProcess):
    """A hub process on loopback serving WS and WSS; stop/start/restart keep its ports and files."""

    def __init__(
        self,
        folder: Path,
        http_port: int,
        https_port: int,
        ca: trustme.CA,
        token: str = TOKEN,
        pythonpath: str = "",  # a folder to put before the checkout on the hub's PYTHONPATH
    ) -> None:
        super().__init__(folder, http_port, pythonpath=pythonpath)
        self.https_port = https_port
        self.ca = ca
        self.token = token

    @property
    def http_port(self) -> int:
        return self.port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}"

    @property
    def wss_url(self) -> str:
        return f"wss://127.0.0.1:{self.https_port}"

    @property
    def ca_pem(self) -> Path:
        return self.folder / "ca.pem"

    def client_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)


def write_hub_files(
    folder: Path,
    ca: trustme.CA,
    http_port: int,
    https_port: int,
    settings: dict[str, Any],
    bind_host: str = "127.0.0.1",
) -> None:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(folder / "hub.key"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "hub.crt"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    tokens = settings.pop(
        "tokens",
        [
            {"token": TOKEN, "keys": ["*"], "name": "test"},
            {"token": EA1_ONLY_TOKEN, "keys": ["EA1"], "name": "ea1-only"},
        ],
    )
    top = {
        "worker_class": "trio",
        "workers": settings.pop("workers", 1),
        "bind": [f"{bind_host}:{https_port}"],
        "insecure_bind": [f"{bind_host}:{http_port}"],
        "certfile": "hub.crt",
        "keyfile": "hub.key",
        "alpn_protocols": settings.pop("alpn_protocols", ["http/1.1"]),
        "websocket_max_message_size": settings.pop("websocket_max_message_size", 1048576),
        "graceful_timeout": settings.pop("graceful_timeout", 2.0),
        "errorlog": "-",
        **{k: settings.pop(k) for k in HYPERCORN_KEYS if k in settings},
    }
    (folder / "hub.toml").write_text(hub_toml(top, settings, tokens))


def new_hub(folder: Path, ca: trustme.CA, settings: dict[str, Any]) -> RunningHub:
    """A hub with these settings in `folder`, on free ports; not started yet."""
    hub = RunningHub(folder, free_port(), free_port(), ca)
    hub.status_token = str(settings.get("status_token", ""))  # plain, if the test sets one
    write_hub_files(folder, ca, hub.http_port, hub.https_port, settings)
    return hub


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def hub_factory(
    tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA
) -> Iterator[Callable[..., RunningHub]]:
    hubs: list[RunningHub] = []

    def make(**settings: Any) -> RunningHub:
        hub = new_hub(tmp_path_factory.mktemp("hub"), ca, settings)
        hubs.append(hub)
        hub.start()
        return hub

    yield make
    for hub in hubs:
        hub.kill()


@pytest.fixture
def hub(hub_factory: Callable[..., RunningHub]) -> RunningHub:
    return hub_factory()


@attrs.define
class RunningRedis:
    """A redis-server of the test's own on a free loopback port, without persistence.

    stop/start keep the port, so that a restart looks to the hubs like a Redis that was down and
    came back empty (the worst case: everything must be resynchronised from the hubs).
    """

    binary: str
    folder: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        self.process = spawn(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            log=self.folder / "redis.log",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "redis.log").read_text()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
            with contextlib.suppress(subprocess.TimeoutExpired):  # not yet: wait on it a moment
                self.process.wait(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        kill_group(self.process)  # like a crash: no goodbye to its clients


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRedis]:
    binary = require_tool("redis-server", "the Redis backplane")
    server = RunningRedis(binary, tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


# The hostile-input tests' hubs (tests/hostile.py); imported here so that pytest finds them.
from hostile import make_hub, shared_hub  # noqa: E402, F401
