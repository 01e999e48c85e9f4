"""Who may read /healthz and /metrics (`status_access`, `status_token`), on a real hub.

They show aggregate counts only, never a table's key or a token's name; still, a hub on a public
address shows them to its own networks alone unless told otherwise, and a status token opens
them from anywhere. Refusals are 401/403 with a JSON body and one log line.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import trio
from conftest import EA1_ONLY_TOKEN, RunningHub
from helpers import publish_frame, publisher

from mt5hub.auth import StatusAccess
from mt5hub.config import HubConfig, Settings, status_access

HubFactory = Callable[..., RunningHub]
STATUS_TOKEN = "status-token-4f2a"
STATUS = ("/healthz", "/metrics")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def test_auto_is_any_on_loopback_binds_and_private_networks_on_others() -> None:
    def access(binds: tuple[str, ...], setting: str = "auto") -> str:
        return status_access(HubConfig(Settings(status_access=setting), binds=binds))

    assert access(("127.0.0.1:8000", "[::1]:8443", "unix:/run/mt5hub.sock")) == "any"
    assert access(("127.0.0.1:8000", "0.0.0.0:8443")) == "private"
    assert access(("0.0.0.0:8443",), "any") == "any"
    assert access(("127.0.0.1:8000",), "token") == "token"


@pytest.mark.parametrize(
    ("access", "client", "allowed"),
    [
        ("private", "127.0.0.1", True),
        ("private", "::ffff:10.1.2.3", True),
        ("private", "192.168.1.20", True),
        ("private", "fd00::5", True),
        ("private", "8.8.8.8", False),
        ("private", "2001:4860::1", False),
        ("loopback", "::1", True),
        ("loopback", "10.1.2.3", False),
        ("loopback", "", True),  # a unix socket
        ("token", "127.0.0.1", False),
        ("any", "8.8.8.8", True),
    ],
)
def test_status_access_by_address(access: str, client: str, allowed: bool) -> None:
    assert (StatusAccess(access, "").check(None, client, False) is None) is allowed


def test_a_proxy_not_trusted_makes_no_client_local() -> None:
    refusal = StatusAccess("loopback", "").check(None, "127.0.0.1", untrusted_proxy=True)
    assert refusal is not None and refusal.status == 403


async def test_private_access_behind_a_trusted_proxy_and_the_status_token_from_anywhere(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(
        status_access="private", status_token=STATUS_TOKEN, trusted_proxies=["127.0.0.1"]
    )
    async with publisher(hub.ws_url, EA1_ONLY_TOKEN) as pub:  # a key and a token name to hide
        await pub.send_message(publish_frame(key="EA1", src="EURUSD_PERIOD_H1"))
        with trio.fail_after(10):
            while hub.get("/healthz")[1].count('"tables":1') == 0:
                await trio.sleep(0.05)
        for path in STATUS:
            assert hub.get(path)[0] == 200  # loopback, directly
            assert hub.get(path, forwarded("10.1.2.3"))[0] == 200  # the office, by the proxy
            status, body = hub.get(path, forwarded("8.8.8.8"))  # the world, by the proxy
            assert status == 401 and json.loads(body)["error"] == "unauthorized", body
            status, body = hub.get(path, {**forwarded("8.8.8.8"), **bearer("wrong")})
            assert status == 403 and json.loads(body) == {
                "error": "forbidden",
                "detail": "invalid status token",
            }
            assert hub.get(path, {**forwarded("8.8.8.8"), **bearer(STATUS_TOKEN)})[0] == 200
            assert hub.get(f"{path}?token={STATUS_TOKEN}", forwarded("8.8.8.8"))[0] == 200
            shown = hub.get(path)[1]
            assert "EA1" not in shown and "EURUSD" not in shown and "ea1-only" not in shown
    log = hub.log()
    assert log.count("refused GET /healthz from 8.8.8.8: 401") == 1
    assert STATUS_TOKEN not in log


async def test_loopback_access_refuses_what_an_untrusted_proxy_forwards(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(status_access="loopback")
    for path in STATUS:
        assert hub.get(path)[0] == 200
        status, body = hub.get(path, forwarded("127.0.0.1"))  # written by anyone: not believed
        assert status == 403 and json.loads(body)["error"] == "forbidden", body
    assert "status routes answer loopback addresses only" in hub.log()


async def test_token_access_needs_the_token_even_on_loopback(hub_factory: HubFactory) -> None:
    hub = hub_factory(status_access="token", status_token=STATUS_TOKEN)
    for path in STATUS:
        status, body = hub.get(path)
        assert status == 401 and "missing status token" in json.loads(body)["detail"], body
        assert hub.get(path, bearer("wrong"))[0] == 403
        assert hub.get(path, bearer(STATUS_TOKEN))[0] == 200
    assert hub.health()["status"] == "ok"  # the launcher's own /healthz, with the token
    log = hub.log()  # one line per address and reason per 10 s: /metrics' were held back
    assert log.count("refused GET /healthz from 127.0.0.1: 401") == 1
    assert STATUS_TOKEN not in log
