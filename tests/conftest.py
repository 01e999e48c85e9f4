"""Fixtures that start a real hub (Hypercorn in a subprocess, WS and WSS at once) on free ports.

`hub_factory(**settings)` writes a hub.toml with those `[mt5hub]` settings into a temporary folder,
with a certificate from a trustme CA, and starts `hypercorn --config hub.toml mt5hub:app`, exactly
as the README does. Tests then talk to it over real sockets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-publisher-token"
EA1_ONLY_TOKEN = "token-for-ea1-only"
IN_CI = os.environ.get("CI") == "true"
pytest_plugins = ["browser"]  # tests/browser.py: Chromium, trusting the tests' CA


sys.path.insert(0, str(ROOT / "scripts"))
from tw_workaround import pong_unless_closing  # noqa: E402  (scripts/ is not a package)

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Keys of hub_factory(**settings) that are Hypercorn's (top level of hub.toml), not [mt5hub]'s.
HYPERCORN_KEYS = (
    "keep_alive_timeout",
    "ssl_handshake_timeout",
    "backlog",
    "read_timeout",
    "accesslog",
)


def _toml_value(value: Any) -> str:
    if value == math.inf:
        return "inf"  # TOML's spelling (JSON has none)
    return json.dumps(value)  # JSON strings, numbers, booleans and lists are valid TOML


@attrs.define
class RunningHub:
    """A hub process on loopback; stop/start/restart keep the same ports and files."""

    folder: Path
    http_port: int
    https_port: int
    ca: trustme.CA
    process: subprocess.Popen[bytes] | None = None
    token: str = TOKEN
    pythonpath: str = ""  # a folder to put before the checkout on the hub's PYTHONPATH

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

    @property
    def log_path(self) -> Path:
        return self.folder / "hub.log"

    def client_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def start(self, timeout: float = 20.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "--config", "hub.toml", "mt5hub:app"],
            cwd=self.folder,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [self.pythonpath, str(ROOT)])),
                "MT5HUB_CONFIG": "hub.toml",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"hub exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/healthz")
                return
            except OSError:  # not listening yet: wait on the process a moment, then ask again
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(0.05)
        raise RuntimeError(f"hub did not answer /healthz within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, as systemd or Ctrl-C would, then wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/healthz")[1])  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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
    workers = settings.pop("workers", 1)
    lines = [
        'worker_class = "trio"',
        f"workers = {workers}",
        f'bind = ["{bind_host}:{https_port}"]',
        f'insecure_bind = ["{bind_host}:{http_port}"]',
        'certfile = "hub.crt"',
        'keyfile = "hub.key"',
        f"alpn_protocols = {_toml_value(settings.pop('alpn_protocols', ['http/1.1']))}",
        f"websocket_max_message_size = {settings.pop('websocket_max_message_size', 1048576)}",
        f"graceful_timeout = {settings.pop('graceful_timeout', 2.0)}",
        'errorlog = "-"',
        *(f"{k} = {_toml_value(settings.pop(k))}" for k in HYPERCORN_KEYS if k in settings),
        "[mt5hub]",
        *(f"{key} = {_toml_value(value)}" for key, value in settings.items()),
    ]
    for grant in tokens:
        lines += ["[[mt5hub.tokens]]", *(f"{k} = {_toml_value(v)}" for k, v in grant.items())]
    (folder / "hub.toml").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def hub_factory(
    tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA
) -> Iterator[Callable[..., RunningHub]]:
    hubs: list[RunningHub] = []

    def make(**settings: Any) -> RunningHub:
        folder = tmp_path_factory.mktemp("hub")
        hub = RunningHub(folder, free_port(), free_port(), ca)
        write_hub_files(folder, ca, hub.http_port, hub.https_port, settings)
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
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
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
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
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
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # like a crash: no goodbye to its clients
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRedis]:
    binary = require_tool("redis-server", "the Redis backplane")
    server = RunningRedis(binary, tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
