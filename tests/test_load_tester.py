"""scripts/fake_dll.py's load test against a real hub: the benchmarks' figures come from it.

Its viewers are a client of their own (websockets' sans-I/O protocol on trio streams), not a
library's connection object, so what a dashboard must do is checked here: answer the hub's
pings (or the hub's flow control stops writing to it), inflate permessage-deflate, speak TLS,
and report every update it got. At a few updates a second nothing is conflated: each viewer
gets each update unless the machine is so busy that a viewer falls 200 ms behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningHub

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
