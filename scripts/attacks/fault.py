"""restart and kill: SIGTERM, or SIGKILL of the process group, under load; the state comes back."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    open_websocket_url,
)

from mt5hub.testing.tables import PAIRS, SignalTable

from .common import AUTH, STATE_FILE, WITNESS_KEY, WITNESS_SRC, digest, since
from .context import Attack, Ctx
from .hub import poll_health, snapshot_tables


def read_state_file(path: Path) -> dict[str, Any]:
    """The state file as the next hub will restore it: per table its seq, n and data."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": str(exc), "tables": {}}
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in document.get("tables", []):
        update = json.loads(entry["update"])
        tables[entry["key"], entry["src"]] = {
            "seq": entry["seq"],
            "n": update.get("n"),
            "digest": digest(update.get("data")),
        }
    return {"saved": document.get("saved"), "tables": tables}


def _gone(pid: int | None) -> bool:
    """The process has exited (a zombie holds no sockets any more)."""
    if pid is None:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


async def _wait_for_snapshot(
    port: int, expected: set[tuple[str, str]], timeout: float
) -> tuple[float | None, dict[tuple[str, str], Any]]:
    """A new viewer every 50 ms until its snapshot holds every expected table."""
    tables: dict[tuple[str, str], Any] = {}
    with trio.move_on_after(timeout):
        while True:
            try:
                tables = await snapshot_tables(port, timeout=2.0)
                if expected <= tables.keys():
                    return time.time(), tables
            except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError):
                pass
            await trio.sleep(0.05)
    return None, tables


def attack_fault(ctx: Ctx, kill: bool) -> Attack:
    hub = ctx.hub
    assert hub.process is not None
    old, worker = hub.process, hub.worker()
    graceful = float(hub.settings["graceful_timeout"])
    signalled = time.time()
    if kill:
        os.killpg(old.pid, signal.SIGKILL)
    else:
        old.send_signal(signal.SIGTERM)
    try:
        code = old.wait(timeout=graceful + 15)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the hub did not exit {graceful + 15:g} s after the signal") from None
    exited = time.time()
    deadline = time.monotonic() + 5
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.01)
    saved = read_state_file(hub.folder / STATE_FILE)
    started = time.time()
    hub.spawn()
    snapshot_at, tables = trio.run(_wait_for_snapshot, hub.port, ctx.tables, 30.0)
    back = trio.run(
        poll_health,
        hub.port,
        lambda h: (
            int(h["publishers"]) >= int(ctx.baseline["publishers"])
            and int(h["viewers"]) >= int(ctx.baseline["viewers"])
        ),
        20.0,
    )
    time.sleep(ctx.plan.fault_after)
    entry = tables.get((WITNESS_KEY, WITNESS_SRC))
    saved_entry = saved["tables"].get((WITNESS_KEY, WITNESS_SRC))
    figures: dict[str, Any] = {
        "signal": "SIGKILL (process group)" if kill else "SIGTERM (master)",
        "exit_code": code,
        "exit_after_s": round(exited - signalled, 2),
        "graceful_timeout": graceful,
        "state_interval": hub.settings["state_interval"],
        "restarted_serving_after_s": since(started, snapshot_at),
        "snapshot_after_signal_s": since(signalled, snapshot_at),
        "tables_expected": len(ctx.tables),
        "tables_in_snapshot": len(ctx.tables & tables.keys()),
        "tables_changed": sorted(
            f"{k}/{s}"
            for (k, s), t in tables.items()
            if (k, s) in ctx.primed and digest(t["data"]) != ctx.primed[k, s]
        ),
        "state_file": {
            "saved_before_signal_s": None
            if saved.get("saved") is None
            else round(signalled - float(saved["saved"]), 2),
            "witness": saved_entry,
            "error": saved.get("error"),
        },
        "snapshot_witness": None
        if entry is None
        else {
            "seq": entry["seq"],
            "n": entry.get("n"),
            "online": entry.get("online"),
            "digest": digest(entry["data"]),
        },
        "witness_back_after_restart_s": since(started, back),
        "times": {"signal": signalled, "exit": exited, "start": started},
    }
    failed = []
    if figures["tables_in_snapshot"] < len(ctx.tables) or figures["tables_changed"]:
        failed.append("the first snapshot after the restart lacks or changed tables")
    if back is None:
        failed.append("the witness did not reconnect")
    if not kill and code != 0:
        failed.append(f"SIGTERM: the hub exited with {code}")
    recover = since(signalled, snapshot_at)
    return Attack(
        "",
        figures,
        time.time(),  # the witness's window: through the normal flow after its return
        recover,
        "from the signal until a new viewer's snapshot holds every table",
        failed,
    )


def finish_fault(attack: Attack, w: dict[str, Any], kill: bool) -> None:
    """What needs the witness's log: the last update it got from the old hub, vs. the restore."""
    f = attack.figures
    times = f.pop("times")
    closes = [
        e for e in w["events"] if e[0] >= times["signal"] and e[1] == "viewer" and e[2] == "closed"
    ]
    old_end = closes[0][0] if closes else times["exit"]
    old = [r for r in w["received"] if r[3] <= old_end]
    last_seq = max((r[1] for r in old), default=None)
    last_n = max((r[0] for r in old), default=None)
    saved = f["state_file"]["witness"]
    snap = f["snapshot_witness"]
    restored_seq = saved["seq"] if saved else None
    behind = None if last_seq is None or restored_seq is None else max(0, last_seq - restored_seq)
    attack.restored_behind = behind
    f["old_hub_last_update_seen"] = {"seq": last_seq, "n": last_n}
    f["restored_seq_behind"] = behind
    f["restored_data_is_a_real_publish"] = bool(
        saved and saved["n"] is not None and w["digests"].get(str(saved["n"])) == saved["digest"]
    )
    if snap is not None and saved is not None and snap["online"] is False:
        f["snapshot_equals_state_file"] = (
            snap["seq"] == saved["seq"] and snap["digest"] == saved["digest"]
        )
    closed_old = Counter(e[3] for e in closes if e[0] <= old_end + 0.5)
    f["witness_viewer_closed_with"] = dict(closed_old)
    first_close = closes[0][0] - times["signal"] if closes else None
    f["witness_closed_after_s"] = None if first_close is None else round(first_close, 2)
    new = [r for r in w["received"] if r[3] > times["start"]]
    first_new = min(new, key=lambda r: r[3]) if new else None
    f["witness_first_update_after_signal_s"] = (
        None if first_new is None else round(first_new[3] - times["signal"], 2)
    )
    reconnects = [
        e
        for e in w["events"]
        if e[0] > times["start"] and e[1] == "publisher" and e[2] == "connected"
    ]
    f["witness_publisher_reconnected_after_restart_s"] = (
        round(reconnects[0][0] - times["start"], 2) if reconnects else None
    )
    if new and restored_seq is not None:
        f["seq_continues"] = min(r[1] for r in new) >= restored_seq + 1
    if not f["restored_data_is_a_real_publish"]:
        attack.checks_failed.append("the restored witness data is not one of its publishes")
    if not kill and behind:
        attack.checks_failed.append(f"SIGTERM lost {behind} updates of the latest state")
    if reconnects == []:
        attack.checks_failed.append("the witness publisher did not reconnect")
    word = "SIGKILL" if kill else "SIGTERM"
    exit_text = (
        f"exit {f['exit_code']} after {f['exit_after_s']} s (1001 to the witness at "
        f"{f['witness_closed_after_s']} s; graceful_timeout {f['graceful_timeout']:g} s)"
        if not kill
        else f"closed: {', '.join(closed_old) or '?'}"
    )
    attack.outcome = (
        f"{word}: {exit_text}; restarted, serving in {f['restarted_serving_after_s']} s; first "
        f"snapshot: {f['tables_in_snapshot']}/{f['tables_expected']} tables, witness restored "
        f"at seq {restored_seq} (last seen from the old hub: {last_seq}); witness publisher back "
        f"{f['witness_publisher_reconnected_after_restart_s']} s after the restart"
    )


async def prime_tables(port: int, count: int, seed: int) -> dict[tuple[str, str], str]:
    """Publish `count` tables once (then leave): the snapshot after a restart must hold them."""
    rng = random.Random(seed)
    primed: dict[tuple[str, str], str] = {}
    async with open_websocket_url(
        f"ws://127.0.0.1:{port}/ws/dll", extra_headers=AUTH, connect_timeout=5, disconnect_timeout=2
    ) as ws:
        for n in range(count):
            key, src = f"EA{n + 1}", f"{PAIRS[n % len(PAIRS)]}_PERIOD_H4"
            data = SignalTable(rng).step()
            message = {"key": key, "src": src, "clientId": f"{key}_prime", "data": data}
            await ws.send_message(json.dumps(message))
            primed[key, src] = digest(data)
        await ws.send_message('{"type":"ping"}')
        with trio.fail_after(10):
            while json.loads(await ws.get_message()).get("type") != "pong":
                pass  # every publish before the ping has been handled
    return primed
