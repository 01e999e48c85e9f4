"""Bounds set by configuration, on a real hub over real sockets (`hypercorn --config hub.toml`).

What publishers can make the hub hold (tables, bytes), a publisher's byte rate, request heads
whatever the reads they arrive in, failed handshakes per address, background tasks that fail,
Hypercorn's exit status when the hub refuses to start, and deployments sharing one Redis. While
each happens, a viewer that connects gets its snapshot and a calm publisher's updates reach it.
No test asserts a timing figure: deadlines only stop a test that would otherwise wait forever.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import ROOT, TOKEN, RunningHub, RunningRedis, free_port, write_hub_files
from helpers import (
    health,
    metric,
    publish_frame,
    publisher,
    receive,
    status_of,
    upgrade_request,
    viewer,
    wait_for,
)
from trio_websocket import WebSocketConnection

HubFactory = Callable[..., RunningHub]
DEADLINE = 60.0


async def calm_update_arrives(hub: RunningHub, value: float) -> None:
    """A new viewer gets its snapshot, and a calm publisher's next update reaches it."""
    async with viewer(hub.ws_url) as ws, publisher(hub.ws_url) as calm:
        assert (await receive(ws, "snapshot", timeout=DEADLINE))["type"] == "snapshot"
        await calm.send_message(publish_frame(key="CALM", client_id="CALM_1", value=value))
        with trio.fail_after(DEADLINE):
            while True:
                update = await receive(ws, "update", timeout=DEADLINE)
                if update["key"] == "CALM" and update["data"][0]["TF_data"][0]["M1"] == value:
                    return


async def error_frame(ws: WebSocketConnection) -> dict[str, Any]:
    return await receive(ws, "error", timeout=DEADLINE)


# -- what publishers can make the hub hold -------------------------------------------------------


async def test_tables_and_bytes_past_the_limits_get_an_error_frame_naming_the_limit(
    hub_factory: HubFactory,
) -> None:
    # A four-row publish is ~2 KB; the hub holds it with ~43 bytes more (type, ts, seq), which
    # the limits below leave room for: three tables of four rows and one of three fit in
    # max_state_bytes, four of four rows do not.
    one = len(publish_frame(key="K0"))
    hub = hub_factory(max_tables=4, max_table_bytes=one + 200, max_state_bytes=4 * one + 100)
    async with publisher(hub.ws_url) as ws:
        for n in range(3):
            await ws.send_message(publish_frame(key=f"K{n}"))
        await wait_for(lambda: _tables(hub, 3), "three tables")

        too_big = publish_frame(key="K0", pairs=("EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "NZD"))
        await ws.send_message(too_big)
        error = await error_frame(ws)
        assert error["code"] == "over_limit" and error["detail"].startswith("max_table_bytes:")

        await ws.send_message(publish_frame(key="K3", pairs=("EURUSD", "GBPUSD", "USDJPY")))
        await wait_for(lambda: _tables(hub, 4), "a fourth table")
        await ws.send_message(publish_frame(key="K4"))
        error = await error_frame(ws)
        assert error["code"] == "over_limit" and error["detail"].startswith("max_tables:")

        # Four tables of ~2 KB fit in max_state_bytes; K3 grown to four rows does not.
        await ws.send_message(publish_frame(key="K3"))
        error = await error_frame(ws)
        assert error["code"] == "over_limit" and error["detail"].startswith("max_state_bytes:")

        # The connection stays up, and tables it holds still take updates within the limits.
        await ws.send_message(publish_frame(key="K1", value=7.0))
        async with viewer(hub.ws_url) as view:
            snapshot = await receive(view, "snapshot", timeout=DEADLINE)
            keys = sorted(t["key"] for t in snapshot["tables"])
            assert keys == ["K0", "K1", "K2", "K3"]
    assert await metric(hub, "mt5hub_rejects_total", reason="over_limit") == 3
    assert (await health(hub))["tables"] == 4


async def _tables(hub: RunningHub, n: int) -> bool:
    return bool((await health(hub))["tables"] == n)


async def test_a_publisher_over_its_byte_rate_is_refused_while_a_calm_one_reaches_viewers(
    hub_factory: HubFactory,
) -> None:
    # Frames well within the frame rate, but 200 KB each at 10 KB/s: the byte rate says no.
    hub = hub_factory(byte_rate=10_000.0, byte_burst=300_000, flood_seconds=3600.0)
    big = publish_frame(key="BIG", pairs=[f"P{n:03d}" for n in range(400)])
    assert 150_000 < len(big) < 250_000
    async with publisher(hub.ws_url) as loud:
        for _ in range(20):
            await loud.send_message(big)
        error = await error_frame(loud)
        assert error["code"] == "rate_limited" and "bytes/s" in error["detail"]
        await calm_update_arrives(hub, 3.0)
    refused = await metric(hub, "mt5hub_rejects_total", reason="rate_limited")
    assert refused >= 10  # the burst (one frame) and 10 KB/s of them got through


# -- request heads --------------------------------------------------------------------------------


async def _answer(port: int, chunks: list[bytes]) -> bytes:
    """Send these chunks as separate segments (TCP_NODELAY, a pause between), read the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answer = b""
    async with stream:
        with trio.fail_after(DEADLINE):
            try:
                for chunk in chunks:
                    await stream.send_all(chunk)
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                pass  # the hub answered and hung up before the rest: read what it said
            while b"\r\n\r\n" not in answer:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                answer += data
    return answer


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[n : n + size] for n in range(0, len(data), size)]


async def test_request_heads_over_the_limits_get_431_however_the_reads_split_them(
    hub: RunningHub,
) -> None:
    many = upgrade_request("/ws", *(f"X-{n}: {n}" for n in range(10_000)))  # ~150 KB
    dense = upgrade_request("/ws", *("a:b" for _ in range(9_000)))  # 9,000 headers in ~48 KB
    counted = upgrade_request("/ws", *(f"x{n}:1" for n in range(101)))  # 101 headers, 1 KB
    large = upgrade_request("/ws", "X-Big: " + "b" * 20_000)  # one header of 20 KB
    for head in (many, dense, counted, large):
        for chunks in ([head], _split(head, len(head) // 2 + 1), _split(head, 1024)):
            answer = await _answer(hub.http_port, chunks)
            assert status_of(answer) == 431, (len(head), len(chunks), answer[:100])
    # Within the limits (100 headers, 16 KB), an upgrade is answered as usual.
    fine = upgrade_request("/ws", *(f"x{n}:1" for n in range(90)), "X-Pad: " + "p" * 10_000)
    for chunks in ([fine], _split(fine, 1024)):
        assert status_of(await _answer(hub.http_port, chunks)) == 101
    assert await metric(hub, "mt5hub_rejects_total", reason="head_too_large") == 12
    await calm_update_arrives(hub, 2.0)


async def test_request_head_limits_are_configurable(hub_factory: HubFactory) -> None:
    hub = hub_factory(max_head_bytes=2048, max_headers=10)
    eleven = upgrade_request("/ws", *(f"x{n}:1" for n in range(6)))  # 5 of its own: 11
    assert status_of(await _answer(hub.http_port, _split(eleven, 7))) == 431
    ten = upgrade_request("/ws", *(f"x{n}:1" for n in range(5)))
    assert status_of(await _answer(hub.http_port, [ten])) == 101
    long_one = upgrade_request("/ws", "X: " + "y" * 2048)
    assert status_of(await _answer(hub.http_port, [long_one])) == 431
    assert "431" in hub.log() and "max_head_bytes" in hub.log() and "max_headers" in hub.log()


# -- failed handshakes ----------------------------------------------------------------------------


async def _handshake(port: int, path: str, *headers: str, source: str = "127.0.0.1") -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    async with stream:
        await stream.send_all(upgrade_request(path, *headers))
        answer = b""
        with trio.fail_after(DEADLINE):
            while b"\r\n\r\n" not in answer:
                data = await stream.receive_some(65536)
                if not data:
                    break
                answer += data
    return answer


async def test_failed_handshakes_past_the_budget_get_429_with_retry_after_and_one_log_line(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(failed_handshakes=5, failed_handshake_window=600.0)
    port = hub.http_port
    began = time.monotonic()
    wrong = "Authorization: Bearer not-the-token"
    answers = [status_of(await _handshake(port, "/ws/dll", wrong)) for _ in range(5)]
    assert answers == [403] * 5
    for _ in range(200):
        answer = await _handshake(port, "/ws/dll", wrong)
        assert status_of(answer) == 429
    retry_after = int(answer.lower().split(b"retry-after: ", 1)[1].split(b"\r\n", 1)[0])
    assert 60 <= retry_after <= 120  # one failure's worth of a 5-per-600-s budget
    # ... for every path and token from that address, the right token too, until it refills
    assert status_of(await _handshake(port, "/ws", "Origin: http://elsewhere.example")) == 429
    assert status_of(await _handshake(port, "/ws/dll", f"Authorization: Bearer {TOKEN}")) == 429
    # Another address is not affected, and its EA publishes to its viewers.
    right = f"Authorization: Bearer {TOKEN}"
    assert status_of(await _handshake(port, "/ws/dll", right, source="127.0.0.2")) == 101
    assert await metric(hub, "mt5hub_rejects_total", reason="too_many_failures") == 202
    lines = [line for line in hub.log().splitlines() if "429" in line and "mt5hub:" in line]
    intervals = 1 + int((time.monotonic() - began) / 10)  # LogThrottle: a line per 10 s at most
    assert 1 <= len(lines) <= intervals, lines  # not one per refusal (202)


async def test_viewers_per_address_count_an_ipv6_slash_64_as_one_address(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(max_viewers_per_ip=3, trusted_proxies=["127.0.0.1"])
    port = hub.http_port

    def via_proxy(address: str) -> str:
        return f"X-Forwarded-For: {address}"

    same_64 = [f"2001:db8:1:2::{n:x}" for n in range(1, 6)]
    streams = []
    try:
        for n, address in enumerate(same_64):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            await stream.send_all(upgrade_request("/ws", via_proxy(address)))
            answer = b""
            with trio.fail_after(DEADLINE):
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive_some(65536)
            assert status_of(answer) == (101 if n < 3 else 429), (address, answer[:200])
        other_64 = await _handshake(port, "/ws", via_proxy("2001:db8:1:3::1"))
        assert status_of(other_64) == 101
    finally:
        for stream in streams:
            await stream.aclose()


# -- background tasks ------------------------------------------------------------------------------

FAULTY_APP = '''
"""The hub, with a state saver that raises (not an OSError) while the file `fault` exists."""
from pathlib import Path

from mt5hub import persist
from mt5hub.routes import create_app

_append = persist.StateStore.append


def append(self, tables, generation):
    if Path("fault").exists():
        raise RuntimeError("injected fault")
    _append(self, tables, generation)


persist.StateStore.append = append
app = create_app()
'''


def _start(folder: Path, http_port: int, app: str) -> subprocess.Popen[bytes]:
    log = open(folder / "hub.log", "ab")  # noqa: SIM115 - the process owns it
    process = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--config", "hub.toml", app],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{folder}", "MT5HUB_CONFIG": "hub.toml"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert process.poll() is None, (folder / "hub.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", http_port), timeout=1):
                return process
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the hub did not listen")


async def test_a_state_saver_that_raises_is_restarted_shown_degraded_and_saves_at_shutdown(
    tmp_path: Path, ca: trustme.CA
) -> None:
    (tmp_path / "faulty.py").write_text(FAULTY_APP)
    hub = RunningHub(tmp_path, free_port(), free_port(), ca)
    write_hub_files(tmp_path, ca, hub.http_port, hub.https_port, {"state_interval": 0.2})
    hub.process = _start(tmp_path, hub.http_port, "faulty:app")
    try:
        async with publisher(hub.ws_url) as ws:
            await ws.send_message(publish_frame(key="A", value=1.0))
            await wait_for(lambda: (tmp_path / "mt5hub-state.json").exists(), "a first save")
            (tmp_path / "fault").touch()
            await ws.send_message(publish_frame(key="A", value=2.0))

            async def degraded() -> bool:
                return bool((await health(hub))["status"] == "degraded")

            await wait_for(degraded, "/healthz degraded")
            status = await health(hub)
            assert status["failing"] == {"state saver": "RuntimeError: injected fault"}
            assert await metric(hub, "mt5hub_task_errors_total", task="state saver") >= 1
            await calm_update_arrives(hub, 4.0)  # the hub serves on

            (tmp_path / "fault").unlink()  # fixed: the restarted saver saves again
            await ws.send_message(publish_frame(key="A", value=3.0))

            async def saved() -> bool:
                return await metric(hub, "mt5hub_state_saves_total") >= 2

            await wait_for(saved, "a save after the fault")
            await ws.send_message(publish_frame(key="B", value=5.0))
            await trio.sleep(0.1)
        assert hub.stop() == 0  # the lifespan is alive: its shutdown saves what is left
        hub.start()
        async with viewer(hub.ws_url) as view:
            snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        values = {t["key"]: t["data"][0]["TF_data"][0]["M1"] for t in snapshot["tables"]}
        assert values == {"A": 3.0, "B": 5.0, "CALM": 4.0}
        assert hub.log().count("state saver: unexpected error") == 1
    finally:
        hub.kill()


# -- refusing to start -----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hub_that_refuses_to_start_exits_non_zero_with_any_number_of_workers(
    tmp_path: Path, ca: trustme.CA, workers: int
) -> None:
    port = free_port()
    settings: dict[str, Any] = {"workers": workers, "state_file": ""}
    if workers > 1:
        settings["backplane"] = "redis://127.0.0.1:1/0"  # never reached: startup refuses first
    write_hub_files(tmp_path, ca, port, free_port(), settings)
    toml = tmp_path / "hub.toml"  # no publisher token at all: the hub refuses to start
    text = toml.read_text().split("[[mt5hub.tokens]]")[0]
    toml.write_text(text.replace("[mt5hub]\n", "[mt5hub]\ntokens = []\n"))
    process = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--config", "hub.toml", "mt5hub:app"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MT5HUB_CONFIG": "hub.toml"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log = output.decode(errors="replace")
    assert process.returncode != 0, log
    assert "no publisher token configured" in log and "mt5hub serving" not in log

    def workers_left() -> bool:
        try:
            os.killpg(process.pid, 0)  # its session's group: Hypercorn's workers too
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + DEADLINE
    while workers_left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not workers_left(), "a worker outlived Hypercorn"


# -- deployments sharing a Redis ------------------------------------------------------------------


async def test_deployments_that_differ_only_in_their_redis_db_do_not_see_each_other(
    hub_factory: HubFactory, redis_server: RunningRedis
) -> None:
    base = f"redis://127.0.0.1:{redis_server.port}"
    one = hub_factory(backplane=f"{base}/1", state_file="")
    two = hub_factory(backplane=f"{base}/2", state_file="")
    also_one = hub_factory(backplane=f"{base}/1", state_file="")
    for hub in (one, two, also_one):

        async def connected(hub: RunningHub = hub) -> bool:
            return bool((await health(hub))["backplane"]["connected"])

        await wait_for(connected, "backplane connected")
    async with viewer(two.ws_url) as on_two, viewer(also_one.ws_url) as on_also_one:
        await receive(on_two, "snapshot", timeout=DEADLINE)
        await receive(on_also_one, "snapshot", timeout=DEADLINE)
        async with publisher(one.ws_url) as ws:
            await ws.send_message(publish_frame(key="DB1", client_id="DB1_1"))
            update = await receive(on_also_one, "update", timeout=DEADLINE)  # same deployment
            assert update["key"] == "DB1"
            async with publisher(two.ws_url) as ws2:
                await ws2.send_message(publish_frame(key="DB2", client_id="DB2_1"))
                update = await receive(on_two, "update", timeout=DEADLINE)
                assert update["key"] == "DB2"  # not DB1: deployment one's events never came
            with trio.move_on_after(1.0):
                while True:  # nothing of deployment two reaches deployment one
                    message = await receive(on_also_one, timeout=DEADLINE)
                    assert message.get("key") != "DB2", message
    assert (await health(two))["tables"] == 1
    assert {t["key"] for t in json.loads(await _snapshot(also_one))["tables"]} == {"DB1"}


async def _snapshot(hub: RunningHub) -> str:
    async with viewer(hub.ws_url) as ws:
        return json.dumps(await receive(ws, "snapshot", timeout=DEADLINE))
