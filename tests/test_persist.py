"""The latest state of every table survives a hub restart (mt5hub/persist.py, Hub.restore).

The saver's timing runs on trio's MockClock, its writes inline (`in_thread=inline`): a worker
thread would let the mock clock jump ahead while it works. The real thread hop, Hypercorn's
shutdown and a SIGKILL are tested at the end on a real hub (conftest's `hub_factory`).
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import RunningHub, RunningRedis
from helpers import publish_frame, publisher, receive, table_rows, viewer
from test_hub_server import DEADLINE, health, synced, wait_for
from trio.testing import MockClock

from mt5hub import persist
from mt5hub.config import Settings, load_config
from mt5hub.hub import Hub, Inbox
from mt5hub.models import Head
from mt5hub.persist import StateStore
from mt5hub.state import SavedTable

CONNECTION = object()  # the publisher connection of the unit tests


async def inline(fn: Callable[[], None]) -> None:
    fn()


def publish(
    hub: Hub, key: str = "EA1", src: str = "S1", client_id: str = "EA1_1", **extra: Any
) -> None:
    """A validated publish from a live connection, as PublisherSession hands it to the hub."""
    text = publish_frame(key=key, src=src, client_id=client_id, **extra)
    hub.publish(CONNECTION, Head(key, src, client_id), json.loads(text), text)


def saved_seqs(path: Path) -> dict[tuple[str, str], int]:
    """What the files on disk say, read as plain JSON (not through the code under test): the
    base, then the entries of its log (`<file>.log`, when its first line names the base)."""
    base = json.loads(path.read_text())
    seqs = {(t["key"], t["src"]): t["seq"] for t in base["tables"]}
    log = path.with_name(path.name + ".log")
    if "log" in base and log.exists():
        header, *entries = log.read_text().splitlines()
        if json.loads(header)["base"] == base["log"]:
            for t in map(json.loads, entries):
                seqs[(t["key"], t["src"])] = max(t["seq"], seqs.get((t["key"], t["src"]), 0))
    return seqs


def samples(hub: Hub, name: str) -> float:
    return float(hub.metrics.registry.get_sample_value(name) or 0.0)


@pytest.fixture
def hub_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The `mt5hub` logger's lines, even where create_app has stopped it propagating."""
    logger = logging.getLogger("mt5hub")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # else caplog would see each line twice
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# -- saving ------------------------------------------------------------------------------------


async def test_tables_are_saved_only_after_a_change_and_at_most_once_per_interval(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hub = Hub(wall_clock=lambda: 1000.0)
    writes: list[float] = []

    async def timed(fn: Callable[[], None]) -> None:
        writes.append(trio.current_time())
        fn()

    store = StateStore(tmp_path / "state.json", interval=1.0, in_thread=timed)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run, hub)
        await trio.sleep(5)
        assert writes == [] and not store.path.exists()  # nothing happened: nothing written
        for n in range(1, 101):  # 100 updates in 3 s
            publish(hub, value=n)
            await trio.sleep(0.03)
        await trio.sleep(2)  # the next interval writes the last of them
        assert 3 <= len(writes) <= 4, writes
        gaps = [later - earlier for earlier, later in itertools.pairwise(writes)]
        assert min(gaps) >= 1.0 - 1e-9, writes
        assert saved_seqs(store.path) == {("EA1", "S1"): 100}
        done = len(writes)
        await trio.sleep(30)
        assert len(writes) == done  # idle again: no write
        nursery.cancel_scope.cancel()
    assert samples(hub, "mt5hub_state_saves_total") == done


async def test_saved_tables_come_back_offline_with_their_seq_which_a_returning_publisher_continues(
    tmp_path: Path,
) -> None:
    before = Hub(wall_clock=lambda: 1000.0)
    for n in range(1, 4):
        publish(before, key="EA1", value=n)
        publish(before, key="EA2", src="S2", client_id="EA2_9", value=-n, note="extra fields too")
    publish(before, key="EA1", value=4)
    assert await StateStore(tmp_path / "state.json", in_thread=inline).save(before)

    after = Hub(wall_clock=lambda: 2000.0)
    assert persist.restore(after, StateStore(tmp_path / "state.json").load()) == 2
    old = {(t["key"], t["src"]): t for t in _snapshot_tables(before)}
    new = {(t["key"], t["src"]): t for t in _snapshot_tables(after)}
    # Exactly what viewers had before (data, seq, clientId, ts, extra fields), but offline.
    assert new == {table: {**entry, "online": False} for table, entry in old.items()}
    assert (new["EA1", "S1"]["seq"], new["EA2", "S2"]["seq"]) == (4, 3)
    assert new["EA1", "S1"]["data"] == table_rows(value=4)
    assert after.changes == 0  # restoring is not a change: nothing to write back

    with after.viewer() as inbox:
        assert isinstance(inbox, Inbox)
        assert json.loads((await inbox.receive.receive()).text)["type"] == "snapshot"
        publish(after, key="EA1", value=5)
        presence = json.loads((await inbox.receive.receive()).text)
        update = json.loads((await inbox.receive.receive()).text)
    assert (presence["type"], presence["key"], presence["online"]) == ("presence", "EA1", True)
    assert (update["type"], update["key"], update["seq"]) == ("update", "EA1", 5)
    assert after.changes == 1


async def test_a_table_the_hub_already_has_is_not_replaced_by_a_restored_one(
    tmp_path: Path,
) -> None:
    old = Hub()
    publish(old, value=1)
    hub = Hub()
    publish(hub, value=2)
    hub.publisher_gone(CONNECTION)
    publish(hub, value=3)
    assert persist.restore(hub, persist.saved_tables(old)) == 0
    [entry] = json.loads(hub.snapshots.everything()[0].text)["tables"]
    assert (entry["seq"], entry["online"], entry["data"]) == (2, True, table_rows(value=3))


async def test_a_save_that_fails_leaves_the_previous_state_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_log: pytest.LogCaptureFixture
) -> None:
    hub = Hub()
    store = StateStore(tmp_path / "state.json", in_thread=inline)
    publish(hub, value=1)
    assert await store.save(hub)
    previous = store.path.read_bytes(), store.log_path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Written, then "disk full" at the fsync: first of an append to the log (cut off again), then
    # of the compaction that follows a failed append (its temporary file removed, no replace).
    monkeypatch.setattr(persist.os, "fsync", disk_full)
    for n in (2, 3):
        publish(hub, value=n)
        assert not await store.save(hub)
    assert (store.path.read_bytes(), store.log_path.read_bytes()) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.log"]
    assert [t.seq for t in StateStore(store.path).load()] == [1]
    assert samples(hub, "mt5hub_state_save_errors_total") == 2
    assert "No space left on device" in store.problem  # /healthz says degraded, and why
    [warning] = lines(hub_log, logging.WARNING)  # once, however often it fails
    assert str(store.path) in warning and "No space left on device" in warning

    monkeypatch.undo()
    assert await store.save(hub)  # retried, and this time it works
    assert saved_seqs(store.path) == {("EA1", "S1"): 3} and store.problem == ""
    assert any("again" in line for line in lines(hub_log, logging.INFO))


async def test_after_the_first_save_only_changed_tables_are_written_until_a_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Hub()
    for n in range(50):
        publish(hub, key=f"EA{n}")
    store = StateStore(tmp_path / "state.json", in_thread=inline)
    assert await store.save(hub)  # the first save of a process: every table, in the base
    base = store.path.read_bytes()
    for value in range(2, 6):  # one table changes: each save appends that table alone
        publish(hub, key="EA7", value=value)
        before = store.log_path.stat().st_size
        assert await store.save(hub)
        added = store.log_path.read_text()[before:]
        assert [json.loads(line)["key"] for line in added.splitlines()] == ["EA7"]
    assert store.path.read_bytes() == base
    assert saved_seqs(store.path)[("EA7", "S1")] == 5
    restored = {t.table: t.seq for t in StateStore(store.path).load()}
    assert len(restored) == 50 and restored[("EA7", "S1")] == 5

    # Once the log is larger than the base (and COMPACT_BYTES), the next save compacts.
    monkeypatch.setattr(persist, "COMPACT_BYTES", 0)
    while store.log_path.stat().st_size <= len(base):
        publish(hub, key="EA7", value=1)
        assert await store.save(hub)
    publish(hub, key="EA8", value=9)
    assert await store.save(hub)
    assert store.path.read_bytes() != base
    assert len(store.log_path.read_text().splitlines()) == 1  # the header of an empty log
    assert {t.table: t.seq for t in StateStore(store.path).load()} == saved_seqs(store.path)


async def test_a_log_line_cut_off_by_a_crash_and_a_log_of_an_older_base_are_ignored(
    tmp_path: Path,
) -> None:
    hub = Hub()
    publish(hub, key="A")
    store = StateStore(tmp_path / "state.json", in_thread=inline)
    assert await store.save(hub)
    publish(hub, key="A", value=2)
    assert await store.save(hub)
    with open(store.log_path, "ab") as log:
        log.write(b'{"key":"A","src":"S1","seq":3,"clientId":"EA1_1","upd')  # killed mid-write
    assert {t.table: t.seq for t in StateStore(store.path).load()} == {("A", "S1"): 2}

    # A log whose first line names another base (a crash between a compaction's base and its
    # new log, say) is not read: here, another store's log, with a table of its own.
    other_hub, other = Hub(), StateStore(tmp_path / "other" / "state.json", in_thread=inline)
    other.path.parent.mkdir()
    publish(other_hub, key="C")
    assert await other.save(other_hub)
    publish(other_hub, key="C", value=2)
    assert await other.save(other_hub)
    assert saved_seqs(other.path) == {("C", "S1"): 2}
    store.log_path.write_bytes(other.log_path.read_bytes())
    assert {t.table: t.seq for t in StateStore(store.path).load()} == {("A", "S1"): 1}


async def test_the_temporary_file_of_a_write_killed_before_its_replace_is_ignored_and_removed(
    tmp_path: Path,
) -> None:
    hub = Hub()
    publish(hub)
    store = StateStore(tmp_path / "state.json", in_thread=inline)
    assert await store.save(hub)
    leftover = tmp_path / ".state.json.k1ll3d.tmp"
    leftover.write_text('{"format":"mt5hub-state","version":1,"tab')  # cut off mid-write
    assert [t.table for t in StateStore(store.path).load()] == [("EA1", "S1")]
    assert not leftover.exists()


async def test_an_older_snapshot_written_late_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """A write abandoned by a cancelled caller may finish after the final save's."""
    hub = Hub()
    publish(hub, value=1)
    older = persist.saved_tables(hub)
    publish(hub, value=2)
    store = StateStore(tmp_path / "state.json")
    store.write(persist.saved_tables(hub), generation=2)
    store.write(older, generation=1)
    assert saved_seqs(store.path) == {("EA1", "S1"): 2}


async def test_the_final_save_writes_the_last_updates_though_shutdown_has_cancelled_everything(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hub = Hub()
    store = StateStore(tmp_path / "state.json", interval=3600.0, in_thread=inline)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run, hub)
        publish(hub, key="LAST")
        nursery.cancel_scope.cancel()  # as Quart cancels its tasks before after_serving
        await store.final_save(hub)
    assert saved_seqs(store.path) == {("LAST", "S1"): 1}


async def test_a_final_save_stuck_on_a_hung_disk_gives_up_after_its_timeout(
    autojump_clock: MockClock, tmp_path: Path, hub_log: pytest.LogCaptureFixture
) -> None:
    async def hung(fn: Callable[[], None]) -> None:
        await trio.sleep_forever()

    hub = Hub()
    publish(hub)
    store = StateStore(tmp_path / "state.json", in_thread=hung)
    start = trio.current_time()
    await store.final_save(hub, timeout=1.0)
    assert trio.current_time() - start == pytest.approx(1.0)
    [warning] = lines(hub_log, logging.WARNING)
    assert "did not finish within 1.0 s" in warning and str(store.path) in warning


# -- loading -----------------------------------------------------------------------------------


def test_without_a_state_file_the_hub_starts_empty_without_a_warning(
    tmp_path: Path, hub_log: pytest.LogCaptureFixture
) -> None:
    assert StateStore(tmp_path / "state.json").load() == []
    assert lines(hub_log, logging.WARNING) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"format":"mt5hub-state","version":1,"tables":[{"key":', "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (b'["EA1"]', "not an mt5hub state file"),
        (b'{"format":"something-else","version":1,"tables":[]}', "not an mt5hub state file"),
        (b'{"format":"mt5hub-state","version":1,"tables":{}}', '"tables" is not a list'),
    ],
    ids=["truncated", "binary", "empty", "a-list", "foreign", "tables-not-a-list"],
)
def test_a_corrupt_state_file_is_moved_aside_with_one_warning_and_the_hub_starts_empty(
    tmp_path: Path, hub_log: pytest.LogCaptureFixture, content: bytes, problem: str
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert StateStore(path, wall_clock=lambda: 1732460000.0).load() == []
    [warning] = lines(hub_log, logging.WARNING)
    aside = tmp_path / "state.json.corrupt-20241124T145320Z"
    assert str(path) in warning and problem in warning and str(aside) in warning
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name]
    assert aside.read_bytes() == content  # kept for a post-mortem, never overwritten


def test_a_second_corrupt_file_in_the_same_second_does_not_overwrite_the_first_one_aside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    for content in (b"first", b"second"):
        path.write_bytes(content)
        StateStore(path, wall_clock=lambda: 1732460000.0).load()
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert kept == {
        "state.json.corrupt-20241124T145320Z": b"first",
        "state.json.corrupt-20241124T145320Z-2": b"second",
    }


def test_a_state_file_of_a_newer_format_version_is_refused_and_kept_aside(
    tmp_path: Path, hub_log: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"format":"mt5hub-state","version":2,"tables":[]}')
    assert StateStore(path, wall_clock=lambda: 1732460000.0).load() == []
    [warning] = lines(hub_log, logging.WARNING)
    assert str(path) in warning and "format version 2" in warning and "version 1" in warning
    assert (tmp_path / "state.json.unsupported-20241124T145320Z").exists()
    assert not path.exists()


async def test_bad_entries_are_skipped_and_counted_and_the_good_ones_restored(
    tmp_path: Path, hub_log: pytest.LogCaptureFixture
) -> None:
    hub = Hub()
    publish(hub, key="GOOD", value=1)
    publish(hub, key="GOOD", value=2)
    path = tmp_path / "state.json"
    assert await StateStore(path, in_thread=inline).save(hub)
    document = json.loads(path.read_text())
    [good] = document["tables"]
    text = good["update"]
    without = {k: v for k, v in good.items() if k != "clientId"}
    document["tables"] += [
        42,
        {**good, "key": "OTHER"},  # the update names another table
        {**good, "src": "S9", "update": text[:40]},  # cut off
        {**good, "src": "S9", "update": "[1, 2]"},
        {**good, "seq": 7},  # the update says seq 2
        {**good, "seq": True},
        {**good, "seq": 0, "update": text.replace('"seq":2', '"seq":0')},
        without,
        {**good, "update": text[:-1] + ',"online":true}'},
        {**good, "update": text.replace('"type":"update"', '"type":"presence"')},
        good,  # the same table twice
    ]
    path.write_text(json.dumps(document))
    restored = StateStore(path).load()
    assert restored == [SavedTable(("GOOD", "S1"), 2, "EA1_1", text)]
    [warning] = lines(hub_log, logging.WARNING)
    assert str(path) in warning and "skipped 11 bad table entries of 12" in warning
    assert "tables[1]: not an object" in warning  # the first one, with its place in the file
    assert path.exists()  # a file with good entries stays where it is


def test_state_interval_must_be_positive_and_the_state_file_may_come_from_the_environment(
    tmp_path: Path,
) -> None:
    assert any("state_interval" in p for p in Settings(state_interval=0).problems())
    assert any("state_interval" in p for p in Settings(state_interval=float("nan")).problems())
    assert Settings().problems() == []
    (tmp_path / "hub.toml").write_text('[mt5hub]\nstate_file = "here.json"\n')
    assert load_config(tmp_path / "hub.toml", environ={}).settings.state_file == "here.json"
    env = {"MT5HUB_STATE_FILE": "/var/lib/mt5hub/state.json"}
    config = load_config(tmp_path / "hub.toml", environ=env)
    assert config.settings.state_file == "/var/lib/mt5hub/state.json"


# -- a real hub, restarted ---------------------------------------------------------------------

HubFactory = Callable[..., RunningHub]
TABLES = [("EA1", "EURUSD_PERIOD_H1", 3), ("EA2", "XAUUSD_PERIOD_M15", 2), ("EA3", "US30", 1)]


async def publish_tables(hub: RunningHub) -> dict[tuple[str, str], dict[str, Any]]:
    """Publish TABLES (each `seq` times, the last with value seq); the snapshot a viewer gets."""
    async with publisher(hub.ws_url) as pub:
        for key, src, times in TABLES:
            for n in range(1, times + 1):
                await pub.send_message(publish_frame(key, src, f"{key}_7", value=n, note=key))
        await synced(pub)
        async with viewer(hub.ws_url) as view:
            snapshot = await receive(view, "snapshot", timeout=DEADLINE)
    return {(t["key"], t["src"]): t for t in snapshot["tables"]}


async def snapshot_of(hub: RunningHub) -> dict[tuple[str, str], dict[str, Any]]:
    async with viewer(hub.ws_url) as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
    return {(t["key"], t["src"]): t for t in snapshot["tables"]}


async def test_restarted_hub_snapshot_holds_the_latest_state_of_every_table_offline(
    hub_factory: HubFactory,
) -> None:
    # No periodic save within the test: what comes back was written by the shutdown's save.
    hub = hub_factory(state_interval=3600.0)
    before = await publish_tables(hub)
    assert {table: t["seq"] for table, t in before.items()} == {
        (key, src): times for key, src, times in TABLES
    }
    await trio.to_thread.run_sync(hub.restart)  # SIGTERM, as systemd does; then start again

    after = await snapshot_of(hub)
    assert after == {table: {**entry, "online": False} for table, entry in before.items()}
    assert after["EA1", "EURUSD_PERIOD_H1"]["data"] == table_rows(value=3)
    assert (await health(hub))["tables"] == 3
    assert "restoring 3 tables" in hub.log()

    async with viewer(hub.ws_url) as view, publisher(hub.ws_url) as pub:
        await receive(view, "snapshot", timeout=DEADLINE)
        await pub.send_message(publish_frame("EA1", "EURUSD_PERIOD_H1", "EA1_8", value=4))
        presence = await receive(view, "presence", timeout=DEADLINE)
        update = await receive(view, "update", timeout=DEADLINE)
    assert (presence["key"], presence["online"]) == ("EA1", True)
    assert (update["key"], update["seq"], update["clientId"]) == ("EA1", 4, "EA1_8")


async def test_killed_hub_comes_back_with_what_it_saved_up_to_one_interval_before(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(state_interval=0.2)
    before = await publish_tables(hub)
    state_file = hub.folder / "mt5hub-state.json"

    async def saved_all() -> bool:
        try:
            seqs = await trio.to_thread.run_sync(saved_seqs, state_file)
        except (OSError, ValueError, KeyError):  # not written yet
            return False
        return seqs == {(key, src): times for key, src, times in TABLES}

    await wait_for(saved_all, "the state file holding the last seq of every table")
    await trio.to_thread.run_sync(hub.kill)  # SIGKILL: no final save
    await trio.to_thread.run_sync(hub.start)
    after = await snapshot_of(hub)
    assert after == {table: {**entry, "online": False} for table, entry in before.items()}


async def test_a_hub_with_a_corrupt_state_file_serves_empty_and_says_so_once(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory()
    await trio.to_thread.run_sync(hub.stop)
    (hub.folder / "mt5hub-state.json").write_text('{"format":"mt5hub-state","tabl')
    await trio.to_thread.run_sync(hub.start)
    assert await snapshot_of(hub) == {}
    unusable = [line for line in hub.log().splitlines() if "unusable" in line]
    assert len(unusable) == 1 and "mt5hub-state.json" in unusable[0], unusable
    assert [p.name for p in hub.folder.glob("mt5hub-state.json.corrupt-*")]


async def test_with_a_redis_backplane_the_state_stays_in_redis_and_no_file_is_written(
    hub_factory: HubFactory, redis_server: RunningRedis
) -> None:
    hub = await trio.to_thread.run_sync(
        functools.partial(hub_factory, backplane=redis_server.url, state_interval=0.1)
    )
    await publish_tables(hub)
    await trio.to_thread.run_sync(hub.stop)  # the final save would write it now
    assert not (hub.folder / "mt5hub-state.json").exists()
    assert "state_file unused: with a backplane the latest state lives in Redis" in hub.log()


def _snapshot_tables(hub: Hub) -> list[dict[str, Any]]:
    return json.loads(hub.snapshots.everything()[0].text)["tables"]  # type: ignore[no-any-return]
