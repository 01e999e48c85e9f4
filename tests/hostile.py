"""What the hostile-input tests share: hubs as production runs them (access log on), the log
of what one test caused, a healthy publisher and viewer that must keep working beside every attack,
and a raw exchange of bytes. Loaded as a pytest plugin by conftest.py (the fixtures `make_hub` and
`shared_hub`).

Every attack has a defined outcome (an HTTP status, a close code or an error frame) and leaves
everyone else undisturbed. Every one that gets as far as a request costs the hub a line in its log
about the offender (what Hypercorn refuses before that, garbage or a head or TLS handshake that
never completes, it drops without one); none ever writes a token or a traceback there. Sleeps
appear only where the attack itself is paced (the slowloris trickle); deadlines only stop a test
that would otherwise hang.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import TOKEN, RunningHub, new_hub
from helpers import (
    DEADLINE,
    publish_frame,
    publisher,
    receive,
    table_rows,
    viewer,
    wait_for,
)
from test_hub_server import next_update
from trio_websocket import WebSocketConnection

HubMaker = Callable[..., RunningHub]
FUZZ_SEED = int(os.environ.get("MT5HUB_FUZZ_SEED", "20261126"))
NEVER_IN_THE_LOG = ("Traceback", "internal error", "Error in ASGI", "Exception Group")


# -- hubs -----------------------------------------------------------------------------------------


def _start_hub(folder: Path, ca: trustme.CA, settings: dict[str, Any]) -> RunningHub:
    """A hub as production runs it: with Hypercorn's access log on (the shipped hub.toml's)."""
    hub = new_hub(folder, ca, {"accesslog": "-", **settings})
    hub.start(timeout=DEADLINE)
    return hub


@pytest.fixture
def make_hub(hub_factory: HubMaker) -> HubMaker:
    """hub_factory's hubs, as production runs them (access log on)."""
    return lambda **settings: hub_factory(accesslog="-", **settings)


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[RunningHub]:
    """One hub for the tests that need nothing special: no rate limit to get in the way."""
    hub = _start_hub(
        tmp_path_factory.mktemp("shared"), ca, {"rate_limit": 100000, "rate_burst": 100000}
    )
    yield hub
    hub.kill()


class LogWatch:
    """The hub's log from the moment this was made: what this test caused, on a shared hub."""

    def __init__(self, hub: RunningHub, whole: bool = False) -> None:
        self.hub, self.start = hub, 0 if whole else len(hub.log())

    def text(self) -> str:
        return self.hub.log()[self.start :]

    def lines(self, *needles: str) -> list[str]:
        return [line for line in self.text().splitlines() if all(n in line for n in needles)]

    async def wait_for_lines(self, count: int, *needles: str) -> list[str]:
        async def logged() -> bool:
            return len(self.lines(*needles)) >= count

        await wait_for(logged, f"{count} log line(s) with {needles}")
        return self.lines(*needles)

    def assert_clean(self) -> None:
        text = self.text()
        for bad in NEVER_IN_THE_LOG:
            assert bad not in text, text
        assert TOKEN not in text


# -- the healthy pair -----------------------------------------------------------------------------


class Healthy:
    """A publisher and a viewer that must keep working whatever happens beside them."""

    def __init__(self, pub: WebSocketConnection, view: WebSocketConnection, key: str) -> None:
        self.pub, self.view, self.key, self.n = pub, view, key, 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, hub: RunningHub, key: str = "HEALTHY", tls: bool = False
    ) -> AsyncIterator[Healthy]:
        url, context = (hub.wss_url, hub.client_ssl_context()) if tls else (hub.ws_url, None)
        async with publisher(url, ssl_context=context) as pub, viewer(url, context) as view:
            await receive(view, "snapshot")
            yield cls(pub, view, key)

    async def still_served(self) -> None:
        """The next publish reaches the viewer, intact, and neither connection was closed."""
        self.n += 1
        await self.pub.send_message(publish_frame(key=self.key, value=self.n))
        update = await next_update(self.view, self.key)
        assert update["data"] == table_rows(value=self.n)
        assert self.pub.closed is None and self.view.closed is None


# -- raw sockets ----------------------------------------------------------------------------------


async def exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send these bytes on a new connection; everything the hub answers until it closes it, and
    how long that took. A reset after the answer counts as closed."""
    started = time.monotonic()
    answer = b""
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            try:
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            except trio.BrokenResourceError:
                pass
    return answer, time.monotonic() - started
