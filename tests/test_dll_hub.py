"""The hub's side of what the DLL relies on: the rate limit in the rate_limited error frame, and
the certificate fingerprint the hub logs at start (which the DLL pins).

The DLL under Wine uses both in tests/test_dll_wine.py; these check them at the hub alone.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RunningHub
from helpers import publish_frame, publisher, receive

from mt5hub.routes import certificate_fingerprint


async def test_rate_limited_says_the_limit_and_burst(
    hub_factory: Callable[..., RunningHub],
) -> None:
    hub = hub_factory(rate_limit=4.5, rate_burst=3)
    async with publisher(hub.ws_url) as ws:
        for n in range(10):
            await ws.send_message(publish_frame(src=f"s{n}"))
        error = await receive(ws, "error")
    assert error["code"] == "rate_limited"
    assert error["limit"] == 4.5 and error["burst"] == 3
    assert error["detail"] == "over 4.5 frames/s"


def test_the_certificate_fingerprint_is_the_sha256_of_the_first_der(
    hub: RunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    der = ssl.PEM_cert_to_DER_cert((hub.folder / "hub.crt").read_text())
    expected = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert f"WSS certificate SHA-256 fingerprint (an EA may pin it): {expected}" in hub.log()
    monkeypatch.chdir(hub.folder)  # certfile is relative to it, as Hypercorn reads it
    assert certificate_fingerprint("hub.toml") == expected
    # A chain file (the server's certificate first) gives the server's fingerprint.
    chain = Path("hub.crt").read_text() + hub.ca_pem.read_text()
    Path("hub.crt").write_text(chain)
    assert certificate_fingerprint("hub.toml") == expected
    assert certificate_fingerprint("missing.toml") is None
    Path("hub.crt").write_text("not a certificate")
    assert certificate_fingerprint("hub.toml") is None
