"""Connection limits on a real hub: per client address, in total, and for publishers on their own.

Clients connect from several loopback addresses (Linux routes all of 127.0.0.0/8 to `lo`), so
"another address" is real. Viewers that flood the hub do the cheapest thing a script can do: a
raw socket, one upgrade request, then silence. Figures (RSS, time) are printed, never asserted.
"""

from __future__ import annotations

import itertools
import resource
import time
from collections import Counter
from collections.abc import Callable

import pytest
import trio
from conftest import IN_CI, TOKEN, RunningHub
from helpers import health, publish_frame, publisher, receive, upgrade_request, viewer
from trio_websocket import WebSocketConnection

from mt5hub.limits import Limits, LogThrottle, client_ip

HubFactory = Callable[..., RunningHub]
DEADLINE = 120.0  # stops a test that would hang; nothing here takes that long on an idle machine


async def raw_handshake(
    port: int, source: str, path: str = "/ws", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], trio.SocketStream]:
    """Connect from `source`, ask for an upgrade, return (status, headers, the open stream)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(upgrade_request(path, *(f"{k}: {v}" for k, v in (headers or {}).items())))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        head += chunk
    status_line, *header_lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines if ": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, stream


def _raise_own_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        message = f"this test needs {wanted} open files; the hard limit is {hard}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _count(hub: RunningHub, needle: str) -> int:
    return sum(needle in line for line in hub.log().splitlines())


async def _wait_for_viewers(hub: RunningHub, count: int) -> float:
    """Seconds until the hub counts this many viewers (it may be too busy to answer at first)."""
    started = time.monotonic()
    with trio.fail_after(DEADLINE):
        while True:
            try:
                if (await health(hub))["viewers"] == count:
                    return time.monotonic() - started
            except OSError:  # /healthz took over 5 s: the hub is still busy closing
                pass
            await trio.sleep(0.05)


# -- the bookkeeping, without sockets -----------------------------------------------------------


def test_a_slot_is_held_for_the_block_and_freed_after_it_whatever_happens() -> None:
    limits = Limits(max_viewers=3, max_viewers_per_ip=2, max_publishers=1)
    with limits.viewer("10.0.0.1") as a, limits.viewer("10.0.0.1") as b:
        assert a is None and b is None
        with limits.viewer("10.0.0.1") as refused:
            assert refused is not None and refused.status == 429
        with limits.viewer("10.0.0.2") as c:
            assert c is None
            with limits.viewer("10.0.0.3") as full:
                assert full is not None and full.status == 503
    with pytest.raises(RuntimeError), limits.viewer("10.0.0.1"):
        raise RuntimeError("the session failed")
    assert limits.viewers == 0
    with limits.publisher() as p, limits.publisher() as q:
        assert p is None and q is not None and q.status == 503
    assert limits.publishers == 0


def test_forwarded_for_is_believed_only_from_a_trusted_proxy_and_only_its_own_hop() -> None:
    trusted = ["127.0.0.1", "10.1.0.0/16"]
    assert client_ip("198.51.100.7", "203.0.113.5", trusted) == "198.51.100.7"
    assert client_ip("127.0.0.1", "203.0.113.5", trusted) == "203.0.113.5"
    assert client_ip("10.1.2.3", "1.1.1.1, 203.0.113.5", trusted) == "203.0.113.5"  # forged left
    assert client_ip("127.0.0.1", None, trusted) == "127.0.0.1"
    assert client_ip("127.0.0.1", " , ", trusted) == "127.0.0.1"


async def test_a_refusal_flood_is_one_log_line_per_address_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle = LogThrottle(every=10.0)
    with caplog.at_level("WARNING", logger="mt5hub"):
        for _ in range(1000):
            throttle.warning("hub_full", "10.0.0.1", "refused %s", "10.0.0.1")
        throttle.warning("hub_full", "10.0.0.2", "refused %s", "10.0.0.2")
        await trio.sleep(10.0)
        throttle.warning("hub_full", "10.0.0.1", "refused %s", "10.0.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 10.0.0.1",
        "refused 10.0.0.2",
        "refused 10.0.0.1 (and 999 more like it)",
    ]


# -- on a real hub ------------------------------------------------------------------------------


async def test_viewers_over_an_address_share_get_429_while_other_addresses_are_served(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(max_viewers_per_ip=20)
    async with viewer(hub.ws_url) as healthy, publisher(hub.ws_url) as pub:
        await receive(healthy, "snapshot")
        answers = [await raw_handshake(hub.http_port, "127.0.0.2") for _ in range(30)]
        statuses = Counter(status for status, _, _ in answers)
        assert statuses == {101: 20, 429: 10}
        refused = [fields for status, fields, _ in answers if status == 429]
        assert all(f["retry-after"] == "5" for f in refused)
        assert all(f["content-type"] == "application/json" for f in refused)
        status, _, other = await raw_handshake(hub.http_port, "127.0.0.3")
        assert status == 101
        await other.aclose()
        await pub.send_message(publish_frame(value=7.0))
        assert (await receive(healthy, "update"))["data"][0]["sum"] > 0
        for _, _, stream in answers:
            await stream.aclose()
        await _wait_for_viewers(hub, 1)
        status, _, stream = await raw_handshake(hub.http_port, "127.0.0.2")
        assert status == 101  # the address's slots came back with its connections
        await stream.aclose()
    assert _count(hub, "refused /ws from 127.0.0.2: 429") == 1


async def test_5000_idle_connections_at_once_are_held_up_to_the_limit_and_the_rest_refused(
    hub_factory: HubFactory,
) -> None:
    """The issue's flood: 5,000 connections at once from five addresses, then silence."""
    _raise_own_open_files(12_000)
    hub = hub_factory(
        max_viewers=3000,
        max_viewers_per_ip=1000,
        max_publishers=10,
        viewer_timeout=600,  # idle means idle: no pong is due while the flood is counted
        slow_viewer_timeout=600,  # and slots are counted: never-reading viewers are for later
        backlog=1024,  # as in hub.toml: Hypercorn's 100 resets connections in such a burst
    )
    sources = [f"127.0.0.{n}" for n in range(2, 7)]
    streams: list[trio.SocketStream] = []
    statuses: Counter[int] = Counter()
    gate = trio.CapacityLimiter(256)  # handshakes in flight at once

    async def connect(source: str) -> None:
        async with gate:
            status, _, stream = await raw_handshake(hub.http_port, source)
        statuses[status] += 1
        streams.append(stream)

    async def feed(ws: WebSocketConnection, done: trio.Event, sent: list[int]) -> None:
        """An EA publishing twice a second all through the flood."""
        while not done.is_set():
            sent.append(len(sent) + 1)
            await ws.send_message(publish_frame(value=sent[-1]))
            with trio.move_on_after(0.5):
                await done.wait()

    async def watch(ws: WebSocketConnection, seen: list[tuple[float, float]]) -> None:
        """A healthy viewer: (arrival time, M1 value) of every update it gets."""
        while True:
            update = await receive(ws, "update", timeout=DEADLINE)
            seen.append((time.monotonic(), update["data"][0]["TF_data"][0]["M1"]))

    async with viewer(hub.ws_url) as healthy, publisher(hub.ws_url) as pub:
        await receive(healthy, "snapshot")
        rss_before = (await health(hub))["rss_bytes"]
        done = trio.Event()
        sent: list[int] = []
        seen: list[tuple[float, float]] = []
        started = time.monotonic()
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, healthy, seen)
                nursery.start_soon(feed, pub, done, sent)
                async with trio.open_nursery() as connections:
                    for n in range(5000):
                        connections.start_soon(connect, sources[n % len(sources)])
                opened = time.monotonic() - started
                done.set()
                # The EA's last update reaches the healthy viewer: nothing it sent was lost.
                while not seen or seen[-1][1] != float(sent[-1]):
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
        assert statuses == {101: 2999, 503: 2001}  # the healthy viewer holds one slot
        held = await health(hub)
        assert held["viewers"] == 3000
        # And a new EA still gets in.
        async with publisher(hub.ws_url) as late:
            await late.send_message(publish_frame(src="LATE", value=3.0))
            assert (await receive(healthy, "update"))["src"] == "LATE"
        print(
            f"\n5000 connections in {opened:.1f} s; hub RSS {rss_before / 2**20:.0f} MiB before, "
            f"{held['rss_bytes'] / 2**20:.0f} MiB holding 3000 viewers; the healthy viewer got "
            f"{len(seen)} of {len(sent)} updates, longest gap {max(gaps, default=0):.2f} s "
            "(published every 0.5 s)"
        )
        for stream in streams:
            await stream.aclose()
        print(f"hub back to its one viewer {await _wait_for_viewers(hub, 1):.1f} s after")
        async with viewer(hub.ws_url) as again:
            await receive(again, "snapshot")
    # One line per address per 10 s window, however many were refused.
    windows = int(opened // 10) + 1
    assert _count(hub, ": 503 the hub holds 3000 viewers already") <= len(sources) * windows
    assert "Traceback" not in hub.log()


async def test_a_viewer_flood_never_locks_out_publishers_which_have_their_own_cap(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(max_viewers=5, max_viewers_per_ip=5, max_publishers=2)
    held = [await raw_handshake(hub.http_port, "127.0.0.2") for _ in range(6)]
    assert [status for status, _, _ in held] == [101] * 5 + [429]
    async with publisher(hub.ws_url) as first, publisher(hub.ws_url):
        status, fields, _ = await raw_handshake(
            hub.http_port, "127.0.0.4", "/ws/dll", {"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 503 and fields["retry-after"] == "5"
        await first.send_message(publish_frame())
        with trio.fail_after(DEADLINE):
            while (await health(hub))["tables"] != 1:
                await trio.sleep(0.05)
    # A bad token is refused for the token, never counted against the publishers' cap.
    status, _, _ = await raw_handshake(hub.http_port, "127.0.0.4", "/ws/dll")
    assert status == 401
    for _, _, stream in held:
        await stream.aclose()


async def test_behind_a_trusted_proxy_the_share_is_per_forwarded_client(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(max_viewers_per_ip=2, trusted_proxies=["127.0.0.1"])
    forwarded = [
        await raw_handshake(hub.http_port, "127.0.0.1", "/ws", {"X-Forwarded-For": client})
        for client in ("203.0.113.5", "203.0.113.5", "203.0.113.5", "203.0.113.6")
    ]
    assert [status for status, _, _ in forwarded] == [101, 101, 429, 101]
    # From an untrusted peer the header is ignored: its own address is what counts.
    direct = [
        await raw_handshake(hub.http_port, "127.0.0.9", "/ws", {"X-Forwarded-For": f"10.0.0.{n}"})
        for n in range(3)
    ]
    assert [status for status, _, _ in direct] == [101, 101, 429]
    assert _count(hub, "refused /ws from 203.0.113.5: 429") == 1
    for _, _, stream in forwarded + direct:
        await stream.aclose()
