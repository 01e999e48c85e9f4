"""mt5hub.testing's hub launcher: a hub it started never outlives the process that started it.

A Python process starts a hub and then ends: killed (SIGKILL: no cleanup of its own runs) or by
a normal exit without stopping the hub. Either way, every process of the hub's group (Hypercorn's
master and its worker) must be gone. A hub started from a thread that then ends lives on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT

from mt5hub.testing.launcher import HubProcess, free_port, hub_toml

DEADLINE = 30.0

STARTER = """
import sys, time
from pathlib import Path
from mt5hub.testing.launcher import HubProcess, free_port, hub_toml

folder, port = Path(sys.argv[1]), free_port()
top = {"worker_class": "trio", "bind": [f"127.0.0.1:{port}"], "graceful_timeout": 1.0}
(folder / "hub.toml").write_text(hub_toml(top, {}, [{"token": "launcher-test", "keys": ["*"]}]))
hub = HubProcess(folder, port)
hub.start()
print(hub.process.pid, flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
else:
    sys.stdin.readline()  # then exit normally, the hub still running
"""


def group_members(pgid: int) -> set[int]:
    """The live processes of a process group (from /proc)."""
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.add(int(entry))
    return members


@pytest.mark.parametrize("end", ["sigkill", "exit"])
def test_a_hub_dies_with_the_process_that_started_it(tmp_path: Path, end: str) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path), "wait" if end == "sigkill" else "exit"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        master = int(starter.stdout.readline())
        members = group_members(master)
        assert master in members and len(members) >= 2, members  # Hypercorn's master and worker
        if end == "sigkill":
            starter.send_signal(signal.SIGKILL)
        else:
            assert starter.stdin is not None
            starter.stdin.write("\n")
            starter.stdin.flush()
        starter.wait(DEADLINE)
        deadline = time.monotonic() + DEADLINE
        while group_members(master) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_members(master), f"outlived the starter: {group_members(master)}"
    finally:
        starter.kill()
        starter.wait()


def test_a_hub_started_from_a_thread_that_ends_lives_on(tmp_path: Path) -> None:
    port = free_port()
    top = {"worker_class": "trio", "bind": [f"127.0.0.1:{port}"], "graceful_timeout": 1.0}
    (tmp_path / "hub.toml").write_text(hub_toml(top, {}, [{"token": "t", "keys": ["*"]}]))
    hub = HubProcess(tmp_path, port)
    thread = threading.Thread(target=hub.start)
    thread.start()
    thread.join()
    try:
        assert hub.health()["status"] == "ok"
        assert hub.stop() == 0
    finally:
        hub.kill()
