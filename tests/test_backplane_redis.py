"""Several hubs sharing one Redis act as one hub: real hubs, a real redis-server, real clients.

Each hub is its own `hypercorn --config hub.toml mt5hub:app` process (conftest), all with
`backplane = <the test's redis-server>`; one test runs a single Hypercorn with `workers = 2`. The
heartbeat is short here (0.2 s, a dead hub expires after 1 s) so that presence tests are quick; the
deadlines only stop a test that would otherwise wait forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from conftest import RunningHub, RunningRedis
from helpers import publish_frame, publisher, receive, viewer
from test_hub_server import DEADLINE, health, metric, next_update, synced, wait_for
from trio_websocket import WebSocketConnection

HubFactory = Callable[..., RunningHub]


@pytest.fixture
def shared_hub(hub_factory: HubFactory, redis_server: RunningRedis) -> Callable[..., RunningHub]:
    """Start a hub on the test's Redis (blocking: call it from a thread inside trio tests)."""

    def make(**settings: Any) -> RunningHub:
        settings = {
            "backplane": redis_server.url,
            "backplane_heartbeat": 0.2,
            "backplane_ttl": 1.0,
            "backplane_timeout": 1.0,
            **settings,
        }
        return hub_factory(**settings)

    return make


async def start_hubs(make: Callable[..., RunningHub], n: int, **settings: Any) -> list[RunningHub]:
    hubs: list[RunningHub] = []
    async with trio.open_nursery() as nursery:
        for _ in range(n):

            async def one() -> None:
                hubs.append(await trio.to_thread.run_sync(lambda: make(**settings)))

            nursery.start_soon(one)
    return hubs


async def presence(ws: WebSocketConnection, key: str) -> dict[str, Any]:
    """The next presence message of table `key`, skipping updates."""
    while True:
        message = await receive(ws, "presence", timeout=DEADLINE)
        if message["key"] == key:
            return message


async def test_publish_on_one_hub_reaches_viewers_on_every_hub_once_and_in_order(
    shared_hub: HubFactory,
) -> None:
    a, b = await start_hubs(shared_hub, 2)
    assert (await health(a))["backplane"]["connected"]
    async with (
        viewer(a.ws_url) as on_a,
        viewer(b.wss_url, b.client_ssl_context()) as on_b,
        publisher(a.ws_url) as pub_a,
        publisher(b.ws_url) as pub_b,
    ):
        for view in (on_a, on_b):
            assert (await receive(view, "snapshot"))["tables"] == []
        for n in range(30):  # as fast as the socket takes them: the backplane merges nothing
            await pub_a.send_message(publish_frame(key="EA1", value=n))
            await pub_b.send_message(publish_frame(key="EA2", value=-n))
        for view in (on_a, on_b):
            got: dict[str, list[int]] = {"EA1": [], "EA2": []}
            while [seqs[-1:] for seqs in got.values()] != [[30], [30]]:
                update = await next_update(view)
                got[update["key"]].append(update["seq"])
            # in order and never twice; a viewer may skip some (its mailbox keeps the latest)
            assert all(seqs == sorted(set(seqs)) for seqs in got.values()), got
        for hub in (a, b):  # but every hub applied every one
            assert await metric(hub, "mt5hub_updates_total") == 60
        # exactly once: one more publish is the very next update everywhere, nothing in between
        await pub_a.send_message(publish_frame(key="EA1", value=99))
        for view in (on_a, on_b):
            assert (await next_update(view))["seq"] == 31
    assert await metric(b, "mt5hub_updates_total") == 61


async def test_snapshot_from_any_hub_even_one_started_later_holds_every_table(
    shared_hub: HubFactory,
) -> None:
    (a,) = await start_hubs(shared_hub, 1)
    async with publisher(a.ws_url) as pub:
        await pub.send_message(publish_frame(key="EA1", value=1.5, extra="kept"))
        await pub.send_message(publish_frame(key="EA1", value=2.5, extra="kept"))
        await synced(pub)
        (late,) = await start_hubs(shared_hub, 1)  # after the publishes: loads them from Redis
        async with viewer(late.ws_url) as view:
            (table,) = (await receive(view, "snapshot"))["tables"]
        assert (table["key"], table["seq"], table["online"]) == ("EA1", 2, True)
        assert table["data"][0]["TF_data"][0]["M1"] == 2.5 and table["extra"] == "kept"


async def test_presence_is_the_same_on_every_hub_and_offline_only_when_the_last_hub_lets_go(
    shared_hub: HubFactory,
) -> None:
    a, b = await start_hubs(shared_hub, 2)
    async with viewer(b.ws_url) as view:
        await receive(view, "snapshot")
        async with publisher(a.ws_url) as pub_a:
            await pub_a.send_message(publish_frame(key="EA1", client_id="EA1_on_a"))
            assert (await presence(view, "EA1"))["online"] is True
            await next_update(view, "EA1")
            async with publisher(b.ws_url) as pub_b:  # the same table, published via hub B too
                await pub_b.send_message(publish_frame(key="EA1", client_id="EA1_on_b"))
                await next_update(view, "EA1")
                await pub_a.aclose()  # A lets go, B still holds it: the table stays online
                await wait_for(lambda: _publishers(a, 0), "hub A saw its publisher leave", DEADLINE)
                await pub_b.send_message(publish_frame(key="EA1", client_id="EA1_on_b"))
                message = await receive(view, "update", "presence")
                assert (message["type"], message["seq"]) == ("update", 3)
        offline = await presence(view, "EA1")  # B let go as well
        assert (offline["online"], offline["clientId"]) == (False, "EA1_on_b")
    async with viewer(a.ws_url) as late:
        (table,) = (await receive(late, "snapshot"))["tables"]
        assert table["online"] is False


async def _publishers(hub: RunningHub, count: int) -> bool:
    return bool((await health(hub))["publishers"] == count)


async def test_hub_killed_with_sigkill_its_tables_go_offline_on_the_other_hubs(
    shared_hub: HubFactory,
) -> None:
    a, b = await start_hubs(shared_hub, 2)
    async with viewer(b.ws_url) as view:
        await receive(view, "snapshot")
        async with publisher(a.ws_url) as pub:
            await pub.send_message(publish_frame(key="DOOMED", client_id="EA_doomed"))
            assert (await presence(view, "DOOMED"))["online"] is True
            await next_update(view, "DOOMED")
            a.kill()  # no goodbye: only the expired heartbeat tells the other hubs
            offline = await presence(view, "DOOMED")
            assert (offline["online"], offline["clientId"]) == (False, "EA_doomed")


async def test_hub_stopped_with_sigterm_withdraws_its_tables_without_waiting_for_expiry(
    shared_hub: HubFactory,
) -> None:
    a, b = await start_hubs(shared_hub, 2, backplane_heartbeat=1.0, backplane_ttl=300.0)
    async with viewer(b.ws_url) as view:
        await receive(view, "snapshot")
        async with publisher(a.ws_url) as pub:
            await pub.send_message(publish_frame(key="LEAVING", client_id="EA_leaving"))
            assert (await presence(view, "LEAVING"))["online"] is True
            assert await trio.to_thread.run_sync(a.stop) == 0
            with trio.fail_after(60):  # far less than the 300 s a dead hub would take
                offline = await presence(view, "LEAVING")
            assert (offline["online"], offline["clientId"]) == (False, "EA_leaving")


async def test_redis_restarted_hubs_serve_locally_then_resync_and_the_latest_state_arrives(
    shared_hub: HubFactory, redis_server: RunningRedis
) -> None:
    a, b = await start_hubs(shared_hub, 2)
    async with (
        viewer(a.ws_url) as on_a,
        viewer(b.ws_url) as on_b,
        publisher(a.ws_url) as pub,
    ):
        for view in (on_a, on_b):
            await receive(view, "snapshot")
        await pub.send_message(publish_frame(key="EA1", value=1))
        for view in (on_a, on_b):
            assert (await next_update(view, "EA1"))["seq"] == 1

        redis_server.stop()
        for hub in (a, b):
            await wait_for(lambda hub=hub: _degraded(hub), "hub reports degraded", DEADLINE)
            assert await metric(hub, "mt5hub_backplane_connected") == 0
        # Alone, hub A still serves its own viewers: nothing its publisher sends is held back.
        for n in (2, 3):
            await pub.send_message(publish_frame(key="EA1", value=n))
            assert (await next_update(on_a, "EA1"))["data"][0]["TF_data"][0]["M1"] == n

        redis_server.start()  # empty: the hubs must put the state back
        for hub in (a, b):
            await wait_for(lambda hub=hub: _connected(hub), "hub reconnects", DEADLINE)
        seen = [await receive(on_b, "update", "presence")]  # what B missed, once Redis is back
        while seen[-1]["type"] != "update":
            seen.append(await receive(on_b, "update", "presence"))
        latest = seen[-1]
        assert (latest["seq"], latest["data"][0]["TF_data"][0]["M1"]) == (3, 3)
        # Redis came back empty and the hubs re-registered one after the other: the table,
        # whose publisher never left, did not flash offline on the dashboards meanwhile.
        assert not [m for m in seen if m["type"] == "presence" and not m["online"]], seen
        async with viewer(b.ws_url) as fresh:
            (table,) = (await receive(fresh, "snapshot"))["tables"]
            assert (table["seq"], table["online"]) == (3, True)

        await pub.send_message(publish_frame(key="EA1", value=4))  # and the stream resumes
        for view in (on_a, on_b):
            update = await next_update(view, "EA1")
            assert (update["seq"], update["data"][0]["TF_data"][0]["M1"]) == (4, 4)
    assert "backplane redis://127.0.0.1" in a.log() and "unreachable" in a.log()


async def test_hub_that_died_while_redis_was_down_has_its_tables_go_offline_after_ttl(
    shared_hub: HubFactory, redis_server: RunningRedis
) -> None:
    a, b = await start_hubs(shared_hub, 2)
    async with viewer(b.ws_url) as view:
        await receive(view, "snapshot")
        async with publisher(a.ws_url) as pub:
            await pub.send_message(publish_frame(key="ORPHAN", client_id="EA_orphan"))
            await next_update(view, "ORPHAN")
            redis_server.stop()
            await wait_for(lambda: _degraded(b), "hub B reports degraded", DEADLINE)
            a.kill()  # dies unseen: Redis is down, and comes back without A's claims
        redis_server.start()
        offline = await presence(view, "ORPHAN")  # one backplane_ttl after B caught up
        assert (offline["online"], offline["clientId"]) == (False, "EA_orphan")


async def _degraded(hub: RunningHub) -> bool:
    status = await health(hub)
    return bool(status["status"] == "degraded" and not status["backplane"]["connected"])


async def _connected(hub: RunningHub) -> bool:
    status = await health(hub)
    return bool(status["status"] == "ok" and status["backplane"]["connected"])


async def test_two_workers_in_one_hypercorn_behave_as_one_hub(shared_hub: HubFactory) -> None:
    (hub,) = await start_hubs(shared_hub, 1, workers=2)
    views: list[WebSocketConnection] = []
    async with trio.open_nursery() as nursery:

        async def connect() -> None:
            async with viewer(hub.ws_url) as view:
                await receive(view, "snapshot")
                views.append(view)
                await trio.sleep_forever()

        # The kernel hands each connection to either worker; connect until both have viewers.
        per_worker: dict[int, int] = {}
        while len([n for n in per_worker.values() if n]) < 2:
            assert len(views) < 64, f"all viewers landed on one worker: {per_worker}"
            for _ in range(4):
                nursery.start_soon(connect)
            await wait_for(_enough(views, len(views) + 4), "viewers connected", DEADLINE)
            per_worker = await _viewers_per_worker(hub)
        assert sum(per_worker.values()) == len(views)
        for key in ("W1", "W2", "W3", "W4"):  # publishers land on either worker too
            async with publisher(hub.ws_url) as pub:
                await pub.send_message(publish_frame(key=key))
                await synced(pub)
        for view in views:  # every viewer, on either worker, gets every table once
            got = [(await next_update(view))["key"] for _ in range(4)]
            assert sorted(got) == ["W1", "W2", "W3", "W4"]
        nursery.cancel_scope.cancel()


async def _viewers_per_worker(hub: RunningHub) -> dict[int, int]:
    """Ask /healthz on many connections at once, so that both workers answer."""
    seen: dict[int, int] = {}

    async def ask() -> None:
        status = await health(hub)
        seen[status["pid"]] = status["viewers"]

    for _ in range(5):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(ask)
        if len(seen) == 2:
            break
    return seen


def _enough(items: list[Any], n: int) -> Callable[[], Any]:
    async def check() -> bool:
        return len(items) >= n

    return check


def test_backplane_url_and_timings_are_checked_when_the_config_loads(tmp_path: Any) -> None:
    from mt5hub.config import load_config
    from mt5hub.errors import ConfigError

    bad = {
        'backplane = "http://127.0.0.1:6379"': "expected redis://",
        "backplane_ttl = 1.0\nbackplane_heartbeat = 2.0": "at least twice",
    }
    for text, problem in bad.items():
        (tmp_path / "hub.toml").write_text(f"[mt5hub]\n{text}\n")
        with pytest.raises(ConfigError, match=problem):
            load_config(tmp_path / "hub.toml", environ={})
    (tmp_path / "hub.toml").write_text("[mt5hub]\n")
    env = {"MT5HUB_BACKPLANE": "redis://:secret@127.0.0.1:6379/0"}
    config = load_config(tmp_path / "hub.toml", environ=env)
    assert config.settings.backplane == env["MT5HUB_BACKPLANE"]
    assert "secret" not in repr(config)


def test_several_workers_without_a_backplane_refuse_to_start_and_say_why(
    hub_factory: HubFactory,
) -> None:
    with pytest.raises(RuntimeError, match=r"hub exited|did not answer") as failed:
        hub_factory(workers=2)
    assert "refusing to start: workers = 2" in str(failed.value)
    assert "backplane" in str(failed.value)


# -- the record format: one definition, Lua and Python held to it ------------------------------


async def test_every_lua_script_compiles_in_redis(redis_server: RunningRedis) -> None:
    import attrs
    import coredis

    from mt5hub.backplane import scripts

    async with coredis.Redis.from_url(redis_server.url) as client:
        lua = scripts.load()
        for field in attrs.fields(scripts.Scripts):
            sha = await client.script_load(getattr(lua, field.name))
            assert len(sha) == 40, field.name


async def test_records_written_by_lua_read_back_as_python_writes_them(
    redis_server: RunningRedis,
) -> None:
    import coredis

    from mt5hub.backplane import records, scripts

    table = ("EA1 «ünï»", "EURUSD_PERIOD_H1")
    text = '{"type":"update","note":"naïve → 日本","n":1}'  # counted in bytes, not characters
    field = records.table_field(table)
    probe = (
        scripts.library("records")
        + "return update_record(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])"
        + " .. presence_record(ARGV[6], ARGV[4], ARGV[7])"
    )
    async with coredis.Redis.from_url(redis_server.url) as client:
        written: Any = await client.eval(
            probe, keys=[], args=["42", "1700000000.25", "hub#7", field, text, "0", "EA1_9"]
        )
    expected = records.update_record(42, "1700000000.25", "hub#7", table, text)
    expected += records.presence_record(False, table, "EA1_9")
    assert written == expected
    assert list(records.parse_records(written)) == [
        records.UpdateRecord(42, 1700000000.25, "hub#7", table, text),
        records.PresenceRecord(False, table, "EA1_9"),
    ]
