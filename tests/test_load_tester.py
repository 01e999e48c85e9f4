"""scripts/fake_dll.py's load test against a real hub: the benchmarks' figures come from it.

Its viewers are a client of their own (websockets' sans-I/O protocol on trio streams), not a
library's connection object, so what a dashboard must do is checked here: answer the hub's
pings (or the hub's flow control stops writing to it), inflate permessage-deflate, speak TLS,
and report every update it got. At a few updates a second nothing is conflated: each viewer
gets each update unless the machine is so busy that a viewer falls 200 ms behind.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningHub

from mt5hub.delta import diff
from mt5hub.testing.tables import PAIRS, TFS, SignalTable

FAKE_DLL = Path(__file__).resolve().parent.parent / "scripts" / "fake_dll.py"
PUBLISHERS, RATE, VIEWERS, SECONDS = 2, 5, 4, 3.0


def run_load(hub: RunningHub, *extra: str) -> dict[str, object]:
    command = [
        sys.executable,
        str(FAKE_DLL),
        "load",
        "--token",
        hub.token,
        "-p",
        str(PUBLISHERS),
        "-r",
        str(RATE),
        "-v",
        str(VIEWERS),
        "--seconds",
        str(SECONDS),
        "--warmup",
        "1",
        "--json",
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheme", "deflate"),
    [("ws", False), ("ws", True), ("wss", True)],
    ids=["ws", "ws-deflate", "wss-deflate"],
)
def test_load_tester_viewers_get_every_update_and_keep_up(
    hub: RunningHub, scheme: str, deflate: bool
) -> None:
    extra = (
        ["--url", hub.ws_url] if scheme == "ws" else ["--url", hub.wss_url, "--ca", str(hub.ca_pem)]
    )
    if deflate:
        extra.append("--deflate")
    result = run_load(hub, *extra)

    expected = PUBLISHERS * RATE * VIEWERS * SECONDS
    assert result["viewers_closed"] == 0
    assert result["publisher_errors"] == 0 and result["publisher_reconnects"] == 0
    assert result["deflate"] is deflate
    # Window edges may take or leave one round of updates; a viewer that stopped answering pings
    # would get about one update per table in all.
    delivered, gaps, conflated = (
        result["updates_delivered"],
        result["seq_gaps"],
        result["hub_conflated"],
    )
    assert isinstance(delivered, int) and isinstance(gaps, int) and isinstance(conflated, float)
    assert expected * 0.8 <= delivered + gaps <= expected * 1.2, result
    assert gaps <= conflated, result  # an update a viewer did not get was replaced by a newer one
    latency = result["latency_ms"]
    assert isinstance(latency, dict) and latency["p50"] is not None
    hub_part = result["hub_mean_latency_ms"]  # read from the hub's histogram
    assert isinstance(hub_part, float) and hub_part >= 0, result
    # Every viewer holds every table at the end: none is as old as the whole run.
    freshness = result["freshness_ms"]
    assert isinstance(freshness, dict)
    assert freshness["max"] < 1000 * SECONDS, result


@pytest.mark.slow
def test_load_tester_runs_with_delta_viewers_and_reports_bytes_per_delivery(
    hub: RunningHub,
) -> None:
    """Until the hub sends patches, delta viewers get full updates: none is a patch error."""
    result = run_load(hub, "--url", hub.ws_url, "--delta", "--change", "0.1")
    assert result["delta"] is True and result["change"] == 0.1
    assert result["patch_errors"] == 0 and result["viewers_closed"] == 0, result
    delivered = result["updates_delivered"]
    assert isinstance(delivered, int) and delivered > 0
    per = result["bytes_per_delivery"]
    assert isinstance(per, dict) and per["all"] is not None and per["all"] > 1000, result


# -- the viewers' bookkeeping and the tables, without a hub -------------------------------------


def load_fake_dll() -> Any:
    spec = importlib.util.spec_from_file_location("fake_dll", FAKE_DLL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake_dll = load_fake_dll()


def entry(key: str, seq: int, *pairs: str, **extra: Any) -> dict[str, Any]:
    data = [{"pair": p, "TF_data": [{"M1": 1.0, "cell_color": "clrGreen"}], "sum": 1.0,
             "sum_cell_color": "clrGreen"} for p in pairs]  # fmt: skip
    return {"type": "update", "key": key, "src": "S", "clientId": key, "seq": seq, "ts": seq,
            "data": data, **extra}  # fmt: skip


def patch_frame(old: dict[str, Any], new: dict[str, Any], base: int | None = None) -> str:
    """The frame the hub sends a delta viewer, as text."""
    header = {"type": "patch", "key": new["key"], "src": new["src"], "seq": new["seq"]}
    base = old["seq"] if base is None else base
    return json.dumps({**header, "base": base, "ts": new["ts"], **diff(old, new)})


def test_a_delta_viewer_keeps_each_table_from_snapshots_updates_and_patches() -> None:
    held = fake_dll.HeldTables()
    first = entry("EA1", 4, "EURUSD", online=True)
    assert held.take({"type": "snapshot", "ts": 1, "tables": [first]}) is None
    new = entry("EA1", 5, "EURUSD", "GBPUSD", sent=2.5)
    state = held.take(json.loads(patch_frame(first, new)))
    assert state == {**new, "online": True}  # online stays what the snapshot said
    assert held.take(json.loads(json.dumps(entry("EA2", 1, "USDJPY")))) == entry("EA2", 1, "USDJPY")
    assert set(held.tables) == {("EA1", "S"), ("EA2", "S")}
    partial = {"type": "snapshot", "partial": True, "tables": [entry("EA3", 7, "AUDUSD")]}
    held.take(partial)  # a subscription: added to what is held
    assert set(held.tables) == {("EA1", "S"), ("EA2", "S"), ("EA3", "S")}
    held.take({"type": "unsubscribed", "tables": [{"key": "EA2", "src": "S"}]})
    assert set(held.tables) == {("EA1", "S"), ("EA3", "S")}
    held.take({"type": "snapshot", "ts": 2, "tables": [entry("EA3", 8)]})  # a new connection's
    assert set(held.tables) == {("EA3", "S")} and held.tables["EA3", "S"]["seq"] == 8
    assert held.take({"type": "presence", "key": "EA3", "src": "S", "online": False}) is None
    assert held.patch_errors == 0


def test_a_patch_whose_base_the_viewer_does_not_hold_is_counted_as_an_error() -> None:
    held = fake_dll.HeldTables()
    first, second, third = (entry("EA1", n, "EURUSD", sent=n) for n in (1, 2, 3))
    held.take(first)
    assert held.take(json.loads(patch_frame(second, third))) is None  # base 2, held 1
    assert held.take(json.loads(patch_frame(first, third, base=9))) is None
    assert held.take(json.loads(patch_frame(entry("EA9", 1), entry("EA9", 2)))) is None  # none held
    assert held.patch_errors == 3
    assert held.tables["EA1", "S"] == first  # left as it was
    assert held.take(json.loads(patch_frame(first, second))) == second


def test_the_change_option_is_a_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    for wrong in ("0", "1.5", "-0.1"):
        with pytest.raises(SystemExit):
            fake_dll.main(["demo", "--change", wrong])
        assert "a fraction in (0, 1]" in capsys.readouterr().err


def test_signal_tables_move_the_fraction_of_cells_asked_and_keep_the_rest() -> None:
    table = SignalTable(random.Random(5), change=0.1)
    before = table.step()
    for _ in range(20):
        after = table.step()
        moved = sum(
            old != new
            for a, b in zip(before, after, strict=True)
            for old, new in zip(a["TF_data"], b["TF_data"], strict=True)
        )
        assert 1 <= moved <= 25  # 10% of 252: 25 move, though some round to the same tenth
        before = after
    assert sum(c != d for c, d in zip(before, table.step(change=1.0), strict=True)) > 20
    lone = SignalTable(random.Random(5), PAIRS[:1], change=0.01)  # 9 cells: at least one moves
    assert lone.step() != lone.step()


def test_signal_tables_that_move_every_cell_walk_as_before() -> None:
    """change=1.0 is the walk the benchmarks' figures were measured with, draw for draw."""
    rng, reference = random.Random(11), random.Random(11)
    table = SignalTable(rng)
    values = {(p, tf): reference.uniform(-80, 80) for p in PAIRS for tf in TFS}
    for _ in range(3):
        rows = table.step()
        for p, tf in values:
            values[p, tf] = max(-100.0, min(100.0, values[p, tf] + reference.gauss(0, 4)))
        assert [c[tf] for c, tf in zip(rows[3]["TF_data"], TFS, strict=True)] == [
            round(values[PAIRS[3], tf], 1) for tf in TFS
        ]
