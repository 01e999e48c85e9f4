"""mt5hub.dll, the MT5 side, built with mingw-w64 and run under Wine against a real hub.

`mt5_dll/build/dlltest.exe` loads the DLL with LoadLibrary and calls it the way an EA does;
these tests drive it line by line over its stdin/stdout (see mt5_dll/tests/dlltest.c) while a
viewer on the hub's `/ws` checks what the hub actually broadcast. Waits are on conditions with
timeouts; the only timing assertions are upper bounds on how long an exported call took.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import ROOT, RunningHub, require_tool

from mt5hub.errors import ProtocolError
from mt5hub.models import Decoder, parse_json

WINE64 = "/usr/lib/wine/wine64"  # Debian installs it off the PATH
WINESERVER = "/usr/lib/wine/wineserver"
MT5_DLL = ROOT / "mt5_dll"

# From mt5_dll/include/mt5hub.h
INSECURE_TLS = 1
CONNECTING, CONNECTED, WAITING, REJECTED = 0, 1, 2, 3
E_HANDLE, E_ARG, E_URL, E_JSON, E_NOT_TABLE, E_TOO_LARGE, E_FULL, E_LIMIT = range(-1, -9, -1)
E_SYSTEM, E_INVALID = -9, -10
QUEUED, COALESCED = 0, 1
SENT, STAT_COALESCED, CONNECTS, HUB_ERRORS, ERRORS, TABLES, BYTES, PINGS = range(8)
RETRY_MS, SEND_RATE, RESENT = 8, 9, 10
MAX_HANDLES, MAX_TABLES, MAX_MESSAGE = 64, 512, 1024 * 1024

# An exported call must never wait on the network; under Wine, on a busy CI machine, a call that
# does no I/O still finishes far below this. A blocking one would take a connect attempt or more.
AT_ONCE_US = 200_000


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# ---- building and Wine -------------------------------------------------------------------


@pytest.fixture(scope="session")
def dll_build() -> Path:
    require_tool("x86_64-w64-mingw32-gcc", "builds mt5hub.dll")
    require_tool("make", "builds mt5hub.dll")
    done = subprocess.run(["make", "-C", str(MT5_DLL)], capture_output=True, text=True)
    assert done.returncode == 0, f"make -C mt5_dll failed:\n{done.stdout}\n{done.stderr}"
    return MT5_DLL / "build"


@pytest.fixture(scope="session")
def wine_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private Wine prefix, created once per session (that takes a while)."""
    require_tool(WINE64, "runs the Windows test program")
    env = {
        **os.environ,
        "WINEPREFIX": str(tmp_path_factory.mktemp("wine") / "prefix"),
        "WINEDEBUG": "-all",
        "WINEDLLOVERRIDES": "mscoree,mshtml=",  # no Mono/Gecko install prompts
    }
    subprocess.run(
        [WINE64, "wineboot", "--init"], env=env, check=True, capture_output=True, timeout=300
    )
    subprocess.run([WINESERVER, "-w"], env=env, check=True, timeout=300)
    yield env
    subprocess.run([WINESERVER, "-k"], env=env, timeout=60)  # only this prefix's server


class DllTest:
    """dlltest.exe under Wine: one command line in, one answer line out."""

    def __init__(self, build: Path, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._stderr = open(log, "wb")  # noqa: SIM115 - closed in quit()
        self.process = subprocess.Popen(
            [WINE64, "dlltest.exe"],
            cwd=build,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next_line(60) == "ready"  # the first Wine start of a session is slow

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(raw.decode("utf-8").rstrip("\r\n"))
        self._lines.put(None)

    def _next_line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"dlltest.exe did not answer within {timeout} s") from None
        if line is None:
            raise AssertionError(
                f"dlltest.exe exited:\n{self.log_path.read_text(errors='replace')}"
            )
        return line

    def call(self, *words: Any, timeout: float = 30.0) -> str:
        """Send one command; returns the answer after "ok "."""
        assert self.process.stdin is not None
        self.process.stdin.write((" ".join(map(str, words)) + "\n").encode("utf-8"))
        self.process.stdin.flush()
        line = self._next_line(timeout)
        assert line.startswith("ok"), f"{words[0]}: {line}"
        return line[3:]

    def ints(self, *words: Any) -> list[int]:
        return [int(w) for w in self.call(*words).split()]

    def open(self, url: str, token: str | None, flags: int = 0) -> int:
        return self.ints("open", url, token or "-", flags)[0]

    def send(self, handle: int, message: dict[str, Any] | str) -> tuple[int, int]:
        """(result, microseconds the call took). Non-ASCII goes in as real characters."""
        text = message if isinstance(message, str) else json.dumps(message, ensure_ascii=False)
        result, took = self.ints("send", handle, text)
        return result, took

    def send_many(self, handle: int, count: int, template: dict[str, Any]) -> tuple[int, int, int]:
        """`count` sends of template with "$i" replaced by 1..count, in strings or as a number
        (a value that is just "$i"): (last result, slowest call us, all calls us)."""
        text = json.dumps(template, ensure_ascii=False).replace('"$i"', "$i")
        rc, slowest, total = self.ints("sendmany", handle, count, text)
        return rc, slowest, total

    def status(self, handle: int) -> tuple[int, int]:
        state, queued = self.ints("status", handle)
        return state, queued

    def last_error(self, handle: int, size: int = 1024) -> tuple[int, str]:
        length, _, text = self.call("error", handle, size).partition(" ")
        return int(length), text

    def stat(self, handle: int, which: int) -> int:
        return self.ints("stat", handle, which)[0]

    def close(self, handle: int) -> tuple[int, int]:
        rc, took = self.ints("close", handle)
        return rc, took

    def threads(self) -> int:
        return self.ints("threads")[0]

    def open_pinned(self, url: str, token: str | None, fingerprint: str) -> int:
        return self.ints("openpin", url, token or "-", fingerprint)[0]

    def lease(self, handle: int, seconds: int) -> int:
        return self.ints("lease", handle, seconds)[0]

    def error_text(self, code: int) -> str:
        """The DLL's own text for a Windows, Winsock or WinHTTP error code."""
        return self.call("errtext", code)

    def wait_state(self, handle: int, state: int, timeout: float = 20.0) -> None:
        wait_until(
            lambda: self.status(handle)[0] == state,
            f"state {state} of handle {handle} (last error: {self.last_error(handle)[1]!r})",
            timeout,
        )

    def quit(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write(b"quit\n")
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


@pytest.fixture
def dll(dll_build: Path, wine_env: dict[str, str], tmp_path: Path) -> Iterator[DllTest]:
    driver = DllTest(dll_build, wine_env, tmp_path / "dlltest.stderr")
    yield driver
    driver.quit()


# ---- a viewer: what the hub broadcast ----------------------------------------------------


class Viewer:
    """A dashboard stand-in on the hub's /ws, run by trio in a background thread.

    `tables` is the hub's truth as a viewer sees it: reset to each snapshot (so after a hub restart
    it only holds what publishers sent again) and updated by every update frame. It reconnects
    whenever the hub goes away.
    """

    def __init__(self, hub: RunningHub) -> None:
        self.url = hub.ws_url + "/ws"
        self.tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.presence: dict[tuple[str, str], bool] = {}
        self.connections = 0
        self.last_failure: BaseException | None = None
        self._changed = threading.Condition()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def __enter__(self) -> Viewer:
        self._thread.start()
        self._ready.wait(10)
        self.wait_for(lambda v: v.connections > 0, "the viewer's first connection")
        return self

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            self._ready.set()
            while True:
                try:
                    # A hub that is shutting down may accept a connection and never answer it.
                    async with trio_websocket.open_websocket_url(self.url, connect_timeout=2) as ws:
                        while True:
                            message = json.loads(await ws.get_message())
                            if message["type"] == "ping":
                                await ws.send_message('{"type":"pong"}')
                            self._record(message)
                except (
                    OSError,
                    trio_websocket.HandshakeError,
                    trio_websocket.ConnectionClosed,
                ) as failure:
                    self.last_failure = failure  # the hub is down or restarting: try again
                    await trio.sleep(0.05)

    def _record(self, message: dict[str, Any]) -> None:
        with self._changed:
            if message["type"] == "snapshot":
                self.connections += 1
                self.tables = {(t["key"], t["src"]): t for t in message["tables"]}
            elif message["type"] == "update":
                self.tables[(message["key"], message["src"])] = message
            elif message["type"] == "presence":
                self.presence[(message["key"], message["src"])] = message["online"]
            self._changed.notify_all()

    def wait_for(
        self, condition: Callable[[Viewer], Any], what: str, timeout: float = 20.0
    ) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self), timeout):
                raise AssertionError(
                    f"viewer: timed out after {timeout} s waiting for {what}; "
                    f"running: {self._thread.is_alive()}, connections: {self.connections}, "
                    f"last failure: {self.last_failure!r}, tables: "
                    f"{ {k: t.get('data') for k, t in self.tables.items()} }"
                )

    def sum_of(self, key: str, src: str) -> float | None:
        table = self.tables.get((key, src))
        return table["data"][0]["sum"] if table else None


def table(
    key: str, src: str, value: Any = 1.0, pair: str = "EURUSD", **extra: Any
) -> dict[str, Any]:
    """A publish in the seed's format; `value` may be the "$i" placeholder of send_many."""
    return {
        "key": key,
        "src": src,
        "clientId": f"{key}_1",
        "data": [
            {
                "pair": pair,
                "TF_data": [
                    {"M5": value, "cell_color": "clrGreen"},
                    {"H1": -0.5, "cell_color": "clrRed"},
                ],
                "sum": value,
                "sum_cell_color": "clrGreen",
            }
        ],
        **extra,
    }


# ---- the tests ---------------------------------------------------------------------------


def test_dll_needs_only_windows_own_dlls(dll_build: Path) -> None:
    objdump = require_tool("x86_64-w64-mingw32-objdump", "inspects mt5hub.dll")
    dump = subprocess.run(
        [objdump, "-p", str(dll_build / "mt5hub.dll")], capture_output=True, text=True, check=True
    ).stdout
    imports = {
        line.split(":", 1)[1].strip().lower() for line in dump.splitlines() if "DLL Name:" in line
    }
    assert imports == {"kernel32.dll", "msvcrt.dll", "winhttp.dll"}
    for name in (
        "Mt5HubOpen",
        "Mt5HubSend",
        "Mt5HubStatus",
        "Mt5HubLastError",
        "Mt5HubStat",
        "Mt5HubClose",
        "Mt5HubThreads",
        "Mt5HubVersion",
        "Mt5HubSetLease",
    ):
        assert f"] {name}\n" in dump, f"{name} is not exported"


def test_publishes_over_ws_and_wss_with_non_ascii_intact(hub: RunningHub, dll: DllTest) -> None:
    with Viewer(hub) as viewer:
        plain = dll.open(hub.ws_url + "/ws/dll", hub.token)
        secure = dll.open(hub.wss_url + "/ws/dll", hub.token, INSECURE_TLS)
        assert plain > 0 and secure > 0 and plain != secure
        dll.wait_state(plain, CONNECTED)
        dll.wait_state(secure, CONNECTED)

        # Non-ASCII in keys, pair names and an extra field, one character outside the BMP (a
        # UTF-16 surrogate pair), and a table of 300 rows (~60 KB) for a larger frame.
        small = table("EA1", "WS_Größe", pair="€URUSD 日本", note="Ünïcødé ✓ 🚀")
        large = table("EA1", "WSS_€", note="wss ✓")
        large["data"] = [dict(large["data"][0], pair=f"Paar-{n}-ü") for n in range(300)]
        assert dll.send(plain, small)[0] == QUEUED
        assert dll.send(secure, large)[0] == QUEUED

        viewer.wait_for(
            lambda v: {("EA1", "WS_Größe"), ("EA1", "WSS_€")} <= v.tables.keys(), "both tables"
        )
        for sent in (small, large):
            got = viewer.tables[(sent["key"], sent["src"])]
            assert got["data"] == sent["data"]
            assert got["note"] == sent["note"]
            assert got["clientId"] == sent["clientId"]
        wait_until(
            lambda: dll.stat(plain, SENT) == 1 and dll.stat(secure, SENT) == 1,
            "the DLL to count its sends",
        )
        for handle in (plain, secure):
            assert dll.status(handle) == (CONNECTED, 0)
            assert dll.stat(handle, CONNECTS) == 1

        # A publish the hub would refuse is refused by the DLL at once, never queued.
        bad = table("EA1", "bad")
        bad["data"][0]["sum"] = "not a number"
        assert dll.send(plain, bad)[0] == E_INVALID
        assert "$.data[0].sum: expected a finite number" in dll.last_error(plain)[1]
        # One only the hub can refuse (its max_rows, 500 by default, is its own setting) gets
        # through; the hub's error frame shows up as the last error, and the link stays up.
        long = table("EA1", "long")
        long["data"] = long["data"] * 501
        assert dll.send(plain, long)[0] == QUEUED
        wait_until(lambda: dll.stat(plain, HUB_ERRORS) == 1, "the hub's error frame")
        length, text = dll.last_error(plain)
        assert text.startswith("hub error bad_schema: $.data: at most 500 rows"), text
        assert length == len(text)
        assert dll.status(plain)[0] == CONNECTED and dll.stat(plain, CONNECTS) == 1
        assert ("EA1", "long") not in viewer.tables


def test_wss_certificate_is_verified_unless_told_otherwise(hub: RunningHub, dll: DllTest) -> None:
    # The hub's certificate comes from a test CA that Wine does not trust.
    handle = dll.open(hub.wss_url + "/ws/dll", hub.token)
    assert dll.send(handle, table("EA1", "never"))[0] == QUEUED
    wait_until(lambda: dll.stat(handle, ERRORS) > 0, "a TLS error")
    assert dll.status(handle) in ((WAITING, 1), (CONNECTING, 1))
    text = dll.last_error(handle)[1]
    assert "TLS" in text and "MT5HUB_FLAG_INSECURE_TLS" in text, text
    assert dll.stat(handle, CONNECTS) == 0 and dll.stat(handle, SENT) == 0
    assert hub.health()["publishers"] == 0


def test_wrong_or_missing_token_shows_in_status_and_last_error(
    hub: RunningHub, dll: DllTest
) -> None:
    wrong = dll.open(hub.ws_url + "/ws/dll", "not-the-token")
    missing = dll.open(hub.ws_url + "/ws/dll", None)
    dll.wait_state(wrong, REJECTED)
    dll.wait_state(missing, REJECTED)
    assert "refused the token (HTTP 403" in dll.last_error(wrong)[1]
    assert "refused the token (HTTP 401" in dll.last_error(missing)[1]
    assert dll.stat(wrong, CONNECTS) == 0
    # A good token on the same hub still works next to them.
    good = dll.open(hub.ws_url + "/ws/dll", hub.token)
    dll.wait_state(good, CONNECTED)


def test_hub_restart_mid_stream(hub_factory: Callable[..., RunningHub], dll: DllTest) -> None:
    # A hub that keeps no state across restarts: the DLL alone must bring every table back.
    hub = hub_factory(state_file="")
    with Viewer(hub) as viewer:
        handle = dll.open(hub.ws_url + "/ws/dll", hub.token)
        dll.wait_state(handle, CONNECTED)
        assert dll.send(handle, table("EA1", "steady", 7.0))[0] == QUEUED
        rc, slowest, _ = dll.send_many(handle, 50, table("EA1", "stream", "$i"))
        assert rc in (QUEUED, COALESCED) and slowest < AT_ONCE_US
        viewer.wait_for(lambda v: v.sum_of("EA1", "stream") == 50, "the stream's 50th state")

        hub.stop()
        dll.wait_state(handle, WAITING)
        # The hub is down: sends return at once, and 2 x 2000 sends leave 2 tables waiting.
        for src in ("stream", "new"):
            rc, slowest, total = dll.send_many(handle, 2000, table("EA1", src, "$i"))
            assert rc == COALESCED
            assert slowest < AT_ONCE_US, f"a send took {slowest} us while the hub was down"
            assert total / 2000 < 2000, f"sends took {total / 2000:.0f} us on average"
        assert dll.status(handle)[1] == 2
        assert dll.stat(handle, STAT_COALESCED) >= 2 * 1999

        hub.start()
        dll.wait_state(handle, CONNECTED, timeout=40)  # backoff with jitter: a few seconds
        # The restarted hub starts empty; the DLL gives it the latest state of every table,
        # including "steady", which the EA did not send again.
        viewer.wait_for(
            lambda v: (
                v.sum_of("EA1", "stream") == 2000
                and v.sum_of("EA1", "new") == 2000
                and v.sum_of("EA1", "steady") == 7.0
            ),
            "the latest state of all three tables after the restart",
        )
        assert dll.status(handle) == (CONNECTED, 0)
        assert dll.stat(handle, CONNECTS) == 2
        assert viewer.connections >= 2


@pytest.mark.slow
def test_a_hub_that_hangs_is_detected_and_left(hub: RunningHub, dll: DllTest) -> None:
    """SIGSTOP: the hub's sockets stay open but nothing answers (a frozen VPS, a half-open link).

    The DLL pings after 10 s of silence and gives the link up after 25 s: the longest test here.
    """
    assert hub.process is not None
    handle = dll.open(hub.ws_url + "/ws/dll", hub.token)
    dll.wait_state(handle, CONNECTED)
    os.killpg(hub.process.pid, signal.SIGSTOP)
    try:
        rc, took = dll.send(handle, table("EA1", "frozen", 1.0))
        assert rc == QUEUED and took < AT_ONCE_US
        wait_until(
            lambda: "no answer from the hub for 25 s" in dll.last_error(handle)[1],
            "the DLL to notice the silence",
            timeout=45,
        )
        wait_until(lambda: dll.status(handle)[0] != CONNECTED, "the link to be given up")
        # Under Wine the reader stays stuck in its receive (on Windows closing the handle ends
        # it): the DLL leaves it behind and retries, and that retry hangs in the handshake.
        assert dll.threads() in (1, 2)
    finally:
        os.killpg(hub.process.pid, signal.SIGCONT)
    wait_until(
        lambda: dll.stat(handle, CONNECTS) == 2 and dll.status(handle) == (CONNECTED, 0),
        "the DLL to reconnect once the hub runs again",
    )
    assert dll.close(handle)[0] == 0
    wait_until(lambda: dll.threads() == 0, "all threads to end, the stuck reader included")


def test_answers_hub_pings_so_the_hub_keeps_it(
    hub_factory: Callable[..., RunningHub], dll: DllTest
) -> None:
    hub = hub_factory(ping_interval=0.3, publisher_timeout=1.5)
    handle = dll.open(hub.ws_url + "/ws/dll", hub.token)
    dll.wait_state(handle, CONNECTED)
    assert dll.send(handle, table("EA1", "quiet"))[0] == QUEUED
    # Idle from here on: the hub pings every 0.3 s; without pongs it would drop the link (4008)
    # after 1.5 s. Wait for well past that.
    wait_until(lambda: dll.stat(handle, PINGS) >= 8, "8 hub pings answered")
    assert dll.status(handle)[0] == CONNECTED
    assert dll.stat(handle, CONNECTS) == 1, dll.last_error(handle)
    assert hub.health()["publishers"] == 1


def test_a_frame_over_the_hubs_limit_is_dropped_not_resent_forever(
    hub_factory: Callable[..., RunningHub], dll: DllTest
) -> None:
    hub = hub_factory(websocket_max_message_size=16384)
    with Viewer(hub) as viewer:
        handle = dll.open(hub.ws_url + "/ws/dll", hub.token)
        dll.wait_state(handle, CONNECTED)
        big = table("EA1", "big", note="z" * 20000)
        assert dll.send(handle, big)[0] == QUEUED
        # The hub closes with 1009; re-sending the table after each reconnect would loop forever.
        wait_until(
            lambda: "refused from now on (1 dropped)" in dll.last_error(handle)[1],
            "the DLL to learn the hub's frame limit",
        )
        dll.wait_state(handle, CONNECTED)
        assert dll.send(handle, big)[0] == E_TOO_LARGE
        assert dll.send(handle, table("EA1", "small", 5.0))[0] == QUEUED
        viewer.wait_for(lambda v: v.sum_of("EA1", "small") == 5.0, "the small table")
        assert ("EA1", "big") not in viewer.tables
        assert dll.stat(handle, CONNECTS) == 2 and dll.stat(handle, TABLES) == 1


def test_send_checks_its_input_and_the_store_is_bounded(dll: DllTest) -> None:
    assert dll.ints("version") == [1]
    for url in (
        "http://127.0.0.1:1/ws/dll",
        "ws://",
        "ws://:80/x",
        "ws://h:0/",
        "ws://h:70000/",
        "ws://h:8000x",
        "wss://h/a#frag",
        "ws://us@er:1/",
    ):
        assert dll.open(url, "t") == E_URL, url
    assert dll.ints("open", "ws://127.0.0.1:1/ws/dll", "t", 8) == [E_ARG]

    # Port 1 refuses connections: the DLL keeps everything for later.
    handle = dll.open("ws://127.0.0.1:1/ws/dll", "t")
    assert handle > 0
    wait_until(lambda: "cannot connect" in dll.last_error(handle)[1], "a connect error")
    assert dll.send(handle, '{"key":"EA1","src":"a"')[0] == E_JSON
    assert dll.send(handle, '{"key":"EA1","src":"a","x":NaN}')[0] == E_JSON
    assert dll.send(handle, '{"key":"EA1","src":"a","x":1e999}')[0] == E_JSON
    assert dll.send(handle, '["key","src"]')[0] == E_JSON
    assert dll.send(handle, '{"key":"EA1","src":"a"} x')[0] == E_JSON
    assert dll.send(handle, '{"key":"EA1","src":7}')[0] == E_NOT_TABLE
    assert dll.send(handle, '{"key":"EA1"}')[0] == E_NOT_TABLE
    assert dll.ints("sendhex", handle, "007BD800007D") == [E_ARG]  # a lone surrogate
    huge = table("EA1", "huge", note="x" * MAX_MESSAGE)
    assert dll.send(handle, huge)[0] == E_TOO_LARGE
    assert dll.send(E_HANDLE, table("EA1", "a"))[0] == E_HANDLE
    assert dll.send(handle + MAX_HANDLES, table("EA1", "a"))[0] == E_HANDLE  # same slot, stale
    assert dll.stat(handle, 99) == E_ARG

    for bad_json in (
        '{"key":"EA1","src":"a","x":01}',
        '{"key":"EA1","src":"a","x":"\\x"}',
        '{"key":"EA1","src":"a","x":"tab\there"}',  # a raw control character in a string
        '{"key":"EA1","src":"a","x":' + "[" * 65 + "]" * 65 + "}",  # nested deeper than 64
    ):
        assert dll.send(handle, bad_json)[0] == E_JSON, bad_json
    head = '{"key":"EA1","src":"deep","clientId":"c","data":[],'
    deep = head + '"x":' + "[" * 60 + "-0.5e3" + "]" * 60 + "}"
    assert dll.send(handle, deep)[0] == QUEUED

    # Escapes name the same table as the plain text does, surrogate pairs included.
    assert dll.send(handle, table("EA1", "ü"))[0] == QUEUED
    rest = ',"clientId":"c","data":[]}'
    assert dll.send(handle, '{"key":"EA\\u0031","src":"\\u00fc"' + rest)[0] == COALESCED
    assert dll.send(handle, table("🚀", "s"))[0] == QUEUED
    assert dll.send(handle, '{"key":"\\ud83d\\ude80","src":"s"' + rest)[0] == COALESCED

    # At most MAX_TABLES tables; a new table beyond that is refused, existing ones still update.
    rc, _, _ = dll.send_many(handle, MAX_TABLES - 3, table("EA1", "t$i"))
    assert rc == QUEUED
    assert dll.status(handle)[1] == MAX_TABLES
    assert dll.send(handle, table("EA1", "one too many"))[0] == E_FULL
    assert dll.send(handle, table("EA1", "t7", 2.0))[0] == COALESCED
    assert dll.stat(handle, TABLES) == MAX_TABLES

    # The byte bound (16 MiB) holds too: ~1 MB tables on a second handle.
    big = dll.open("ws://127.0.0.1:1/ws/dll", "t")
    rc, _, _ = dll.send_many(big, 20, table("EA1", "big$i", note="y" * (MAX_MESSAGE - 500)))
    assert rc == E_FULL
    assert 15 <= dll.stat(big, TABLES) <= 16 and dll.stat(big, BYTES) <= 16 * 1024 * 1024

    # last_error fills the caller's buffer with a truncated, terminated copy; returns full length.
    length, full = dll.last_error(handle)
    cut_length, cut = dll.last_error(handle, 11)
    assert cut_length == length and cut == full[:10]

    # All handles in use: the next open is refused.
    others = [dll.open("ws://127.0.0.1:1/ws/dll", "t") for _ in range(MAX_HANDLES - 2)]
    assert all(h > 0 for h in others)
    assert dll.open("ws://127.0.0.1:1/ws/dll", "t") == E_LIMIT
    for h in [handle, big, *others]:
        assert dll.close(h)[0] == 0
    wait_until(lambda: dll.threads() == 0, "all the DLL's threads to end")


def test_close_flushes_and_stops_its_thread_then_the_dll_unloads(
    hub: RunningHub, dll: DllTest
) -> None:
    with Viewer(hub) as viewer:
        handles = {
            "ws": dll.open(hub.ws_url + "/ws/dll", hub.token),
            "wss": dll.open(hub.wss_url + "/ws/dll", hub.token, INSECURE_TLS),
        }
        for handle in handles.values():
            dll.wait_state(handle, CONNECTED)
        down = dll.open("ws://127.0.0.1:1/ws/dll", hub.token)  # never connects
        assert dll.threads() == 5  # an I/O thread per handle, a reader per connected one

        # Close right after the last send, as an EA's OnDeinit would: the state still arrives.
        for name, handle in handles.items():
            assert dll.send(handle, table("EA1", f"last-{name}", 3.0))[0] == QUEUED
            rc, took = dll.close(handle)
            assert rc == 0 and took < AT_ONCE_US
        rc, took = dll.close(down)
        assert rc == 0 and took < AT_ONCE_US

        viewer.wait_for(
            lambda v: (
                all(v.sum_of("EA1", f"last-{n}") == 3.0 for n in handles)
                and all(v.presence.get(("EA1", f"last-{n}")) is False for n in handles)
            ),
            "the last states, then the publishers going offline",
        )
        wait_until(lambda: dll.threads() == 0, "the DLL's threads to end", timeout=10)
        wait_until(lambda: hub.health()["publishers"] == 0, "the hub to count no publisher")
        for handle in [*handles.values(), down]:
            assert dll.status(handle) == (E_HANDLE, -1)
            assert dll.close(handle)[0] == E_HANDLE
        # No thread holds the DLL any more: FreeLibrary really unloads it.
        assert dll.call("unload") == "unloaded"


# ---- a hub that does not answer, a hub with a low rate limit, reconnects ---------------------


class SilentServer:
    """Accepts TCP connections and never says a word: a hung hub, or a port that is not one."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                self.accepted.append(self.listener.accept()[0])

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()
        self._thread.join(5)


def test_a_hub_that_accepts_but_never_answers_is_given_up_on(dll: DllTest) -> None:
    """Wine's WinHTTP waits for an upgrade answer forever unless told otherwise."""
    with SilentServer() as silent:
        handles = [
            dll.open(f"ws://127.0.0.1:{silent.port}/ws/dll", "t"),
            dll.open(f"wss://127.0.0.1:{silent.port}/ws/dll", "t", INSECURE_TLS),
        ]
        for handle in handles:
            wait_until(
                lambda h=handle: "did not answer" in dll.last_error(h)[1],
                "the DLL to give up on the silent server",
                timeout=45,
            )
            assert dll.stat(handle, CONNECTS) == 0
            assert dll.status(handle)[0] in (CONNECTING, WAITING)
        assert "did not answer the WebSocket handshake within 10 s" in dll.last_error(handles[0])[1]
        # Closed while a handshake may be waiting again: the threads still end, and the DLL
        # unloads, within the handshake timeout rather than never.
        for handle in handles:
            assert dll.close(handle)[0] == 0
        wait_until(lambda: dll.threads() == 0, "the DLL's threads to end", timeout=30)
        assert len(silent.accepted) >= 2
    assert dll.call("unload") == "unloaded"


def test_a_hub_rate_limit_is_learned_and_every_latest_state_arrives(
    hub_factory: Callable[..., RunningHub], dll: DllTest
) -> None:
    """28 tables at once into a hub that takes 10 frames/s (burst 10): the hub drops the excess,
    says so with its limit, and the DLL slows down and sends what may have been dropped again."""
    hub = hub_factory(rate_limit=10, rate_burst=10, state_file="")
    with Viewer(hub) as viewer:
        handle = dll.open(hub.ws_url + "/ws/dll", hub.token)
        dll.wait_state(handle, CONNECTED)
        assert dll.stat(handle, SEND_RATE) == 40 * 60
        rc, _, _ = dll.send_many(handle, 28, table("EA1", "t$i", "$i"))
        assert rc == QUEUED
        viewer.wait_for(
            lambda v: all(v.sum_of("EA1", f"t{i}") == i for i in range(1, 29)),
            "the latest state of all 28 tables",
            timeout=30,
        )
        assert dll.stat(handle, HUB_ERRORS) >= 1
        assert dll.stat(handle, RESENT) >= 28 - 10
        assert dll.stat(handle, SEND_RATE) == 10 * 60 * 0.9  # 90% of what the hub said
        assert "hub error rate_limited" in dll.last_error(handle)[1]
        # Slower now, it stays under the limit: 28 new states in a row are not dropped again.
        errors = dll.stat(handle, HUB_ERRORS)
        rc, _, _ = dll.send_many(handle, 28, table("EA1", "t$i", 100))
        viewer.wait_for(
            lambda v: all(v.sum_of("EA1", f"t{i}") == 100 for i in range(1, 29)),
            "the second round of 28 states",
            timeout=30,
        )
        assert dll.stat(handle, HUB_ERRORS) == errors
        assert dll.stat(handle, CONNECTS) == 1  # never over the limit long enough to be cut off


def test_reconnects_within_seconds_after_a_long_outage(
    hub_factory: Callable[..., RunningHub], dll: DllTest
) -> None:
    hub = hub_factory()
    handle = dll.open(hub.ws_url + "/ws/dll", hub.token)
    dll.wait_state(handle, CONNECTED)
    assert dll.stat(handle, RETRY_MS) == 0
    hub.stop()
    # Seven failed attempts: the delay doubles from 0.25-0.5 s and stops at 2-4 s (with jitter).
    delays: set[int] = set()

    def attempts_seen() -> bool:
        delays.add(dll.stat(handle, RETRY_MS))
        return dll.stat(handle, ERRORS) >= 8

    wait_until(attempts_seen, "seven reconnect attempts", timeout=60)
    delays.discard(0)
    assert delays and max(delays) <= 4000, sorted(delays)
    assert len([d for d in delays if d >= 2000]) >= 2, f"no jitter at the cap: {sorted(delays)}"
    hub.start()
    dll.wait_state(handle, CONNECTED, timeout=15)  # the next attempt, at most 4 s away
    assert dll.stat(handle, RETRY_MS) == 0


def test_windows_error_codes_get_plain_words(dll: DllTest) -> None:
    for code, words in (
        (10060, "the hub's address did not answer"),
        (10061, "nothing listens on that port"),
        (10054, "connection reset"),
        (10065, "host unreachable"),
        (11001, "host name not found"),
        (12002, "timed out"),
        (12029, "is the hub running"),
        (12030, "connection reset or aborted"),
        (12175, "certificate rejected"),
    ):
        text = dll.error_text(code)
        assert words in text and text.endswith(f"({code})"), text
    # Codes without words of ours get Windows' own text, never nothing.
    assert dll.error_text(5).endswith("(5)") and len(dll.error_text(5)) > 4


# ---- HTTP/1.1 only ---------------------------------------------------------------------------


class RecordingServer:
    """Reads one request head per connection and closes; over TLS it offers h2 first (ALPN)."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self.alpn: list[str | None] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = self.listener.accept()
                with contextlib.suppress(OSError, ssl.SSLError):
                    conn = raw
                    if self.context is not None:
                        conn = self.context.wrap_socket(raw, server_side=True)
                        self.alpn.append(conn.selected_alpn_protocol())
                    conn.settimeout(10)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    self.heads.append(head)
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                raw.close()

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self._thread.join(5)


def test_the_upgrade_is_http_1_1_even_where_h2_is_offered(
    dll: DllTest, tmp_path: Path, ca: Any
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with RecordingServer() as plain, RecordingServer(context) as secure:
        handles = [
            dll.open(f"ws://127.0.0.1:{plain.port}/ws/dll", "t"),
            dll.open(f"wss://127.0.0.1:{secure.port}/ws/dll", "t", INSECURE_TLS),
        ]
        wait_until(lambda: plain.heads and secure.heads, "a request on each server")
        for handle in handles:
            wait_until(lambda h=handle: "HTTP 404" in dll.last_error(h)[1], "the 404 to show")
    assert secure.alpn[0] in (None, "http/1.1"), secure.alpn  # never h2
    for head in (plain.heads[0], secure.heads[0]):
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "GET /ws/dll HTTP/1.1", lines[0]
        fields = {
            name.lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if ":" in line)
        }
        assert fields["upgrade"].lower() == "websocket"
        assert "http2-settings" not in fields  # no h2c upgrade either


# ---- the lease -------------------------------------------------------------------------------


def test_a_handle_whose_ea_is_gone_is_closed_when_its_lease_runs_out(
    hub: RunningHub, dll: DllTest
) -> None:
    with Viewer(hub) as viewer:
        gone = dll.open(hub.ws_url + "/ws/dll", hub.token)
        alive = dll.open(hub.ws_url + "/ws/dll", hub.token)
        for handle, name in ((gone, "gone"), (alive, "alive")):
            dll.wait_state(handle, CONNECTED)
            assert dll.lease(handle, 2) == 0
            assert dll.send(handle, table("EA1", name))[0] == QUEUED
        assert dll.lease(gone, -1) == E_ARG
        viewer.wait_for(lambda v: v.presence.get(("EA1", "gone")) is True, "gone online")

        # Only `alive` is called from here on, as its EA's OnTimer would call Status.
        def gone_offline() -> bool:
            assert dll.status(alive)[0] == CONNECTED
            return viewer.presence.get(("EA1", "gone")) is False

        wait_until(gone_offline, "the handle nobody calls to go offline", timeout=30)
        wait_until(lambda: dll.threads() == 2 and bool(dll.status(alive)), "its threads to end")
        assert dll.status(gone) == (E_HANDLE, -1)
        assert viewer.presence.get(("EA1", "alive")) is True
        assert dll.lease(alive, 0) == 0  # no lease: as before leases existed
        assert dll.close(gone)[0] == 0  # a late OnDeinit finds it closed already; no harm
        assert dll.close(alive)[0] == 0
        wait_until(lambda: dll.threads() == 0, "all threads to end")


# ---- the hub's rules, checked by the DLL before it queues ------------------------------------


def hub_accepts(text: str) -> bool:
    """What the hub makes of a publisher's frame: accepted as a publish, or refused."""
    try:
        obj = parse_json(text)
        if not isinstance(obj, dict) or obj.get("type", "publish") != "publish":
            return False
        Decoder(max_rows=500).accept(obj)
    except ProtocolError:
        return False
    return True


def publish_text(**changes: Any) -> str:
    """A valid publish as JSON text, with top-level fields changed (None removes one)."""
    message = table("EA1", "rules")
    for name, value in changes.items():
        if value is None:
            del message[name]
        else:
            message[name] = value
    return json.dumps(message, ensure_ascii=False)


def with_row(**changes: Any) -> str:
    row = dict(table("EA1", "rules")["data"][0])
    for name, value in changes.items():
        if value is None:
            del row[name]
        else:
            row[name] = value
    return publish_text(data=[row])


def with_cell(cell: Any) -> str:
    return with_row(TF_data=[{"M5": 1.0, "cell_color": "clrGreen"}, cell])


RULE_CASES = [
    publish_text(),
    publish_text(clientId=None),
    publish_text(clientId=""),
    publish_text(clientId=7),
    publish_text(clientId="c" * 128),
    publish_text(clientId="c" * 129),
    publish_text(key="é" * 128),  # 128 characters, 256 bytes
    publish_text(key="é" * 129),
    publish_text(src="a\u0085b"),  # C1 control
    publish_text(src="a\u007fb"),
    publish_text(src="a\tb"),
    publish_text(src="a\u00a0b"),  # no-break space: fine
    publish_text(src="🚀" * 128),
    publish_text(data=None),
    publish_text(data={}),
    publish_text(data=[]),
    publish_text(data=[1]),
    publish_text(type="publish"),
    publish_text(type="ping"),
    publish_text(type=5),
    publish_text(extra={"nested": [1, {"a": None}]}, seq=5, online=True),
    with_row(pair=None),
    with_row(pair=""),
    with_row(pair="p" * 64),
    with_row(pair="p" * 65),
    with_row(pair=["EURUSD"]),
    with_row(TF_data=None),
    with_row(TF_data={}),
    with_row(TF_data=[]),
    with_row(TF_data=[{"M1": 1, "cell_color": ""}] * 32),
    with_row(TF_data=[{"M1": 1, "cell_color": ""}] * 33),
    with_row(sum=None),
    with_row(sum="1"),
    with_row(sum=True),
    with_row(sum=None, total=1),
    with_row(sum=10**30),
    with_row(sum_cell_color=None),
    with_row(sum_cell_color="c" * 64),
    with_row(sum_cell_color="c" * 65),
    with_row(sum_cell_color="red\n"),
    with_row(sum_cell_color=1),
    with_row(note="rows keep extra fields"),
    with_cell({"H1": 1}),
    with_cell({"cell_color": "x"}),
    with_cell({"H1": 1, "H4": 2, "cell_color": "x"}),
    with_cell({"H-1": 1, "cell_color": "x"}),
    with_cell({"H" * 16: 1, "cell_color": "x"}),
    with_cell({"H" * 17: 1, "cell_color": "x"}),
    with_cell({"Ä1": 1, "cell_color": "x"}),
    with_cell({"H1": "1", "cell_color": "x"}),
    with_cell({"H1": None, "cell_color": "x"}),
    with_cell({"H1": False, "cell_color": "x"}),
    with_cell({"H1": -0.0, "cell_color": "x" * 65}),
    with_cell({"H1": 1, "cell_color": 3}),
    with_cell([1, 2]),
    # Written out: names given twice, and escapes.
    publish_text().replace('"key": "EA1"', '"key": "EA1", "key": "EA1"'),
    publish_text().replace('"data":', '"x": 1, "x": 2, "data":'),
    publish_text().replace('"clientId": "EA1_1"', '"clientId": "\\ud800"'),
    publish_text().replace('"pair": "EURUSD"', '"pair": "EUR\\udc00USD"'),
    publish_text().replace('"pair": "EURUSD"', '"pair": "EUR\\ud83d\\ude80"'),
    publish_text().replace('"pair": "EURUSD"', '"pair": "EUR\\u0000"'),
    publish_text().replace('"pair": "EURUSD"', '"pair": "EURUSD", "pair": "GBPUSD"'),
    publish_text().replace('{"M5": 1.0,', '{"M5": 1.0, "M5": 2.0,'),
    publish_text().replace('"cell_color": "clrRed"', '"cell_color": 1, "cell_color": "clrRed"'),
]


def test_send_refuses_what_the_hub_refuses_by_the_same_rules(dll: DllTest) -> None:
    """Every case goes to the hub's own decoder (in this process) and to the DLL: both accept it
    or both refuse it. The DLL says which rule, and never queues what it refused."""
    handle = dll.open("ws://127.0.0.1:1/ws/dll", "t")  # never connects: all stays queued
    verdicts = []
    for text in RULE_CASES:
        tables_before = dll.stat(handle, TABLES)
        rc, _ = dll.send(handle, text)
        assert rc in (QUEUED, COALESCED, E_INVALID, E_NOT_TABLE), (rc, text)
        accepted = rc >= 0
        verdicts.append((accepted, hub_accepts(text), text))
        if not accepted:
            assert dll.stat(handle, TABLES) == tables_before
    disagreements = [(ours, text) for ours, hubs, text in verdicts if ours != hubs]
    assert not disagreements, disagreements
    assert sum(accepted for accepted, _, _ in verdicts) >= 15  # both sides of the rules ran
    assert sum(not accepted for accepted, _, _ in verdicts) >= 30

    # The three of the report: a distinct code at once, the rule in the last error, nothing kept.
    for text, rule in (
        (publish_text(clientId=None), "$.clientId: required field missing"),
        (RULE_CASES[-9], "$.key: given more than once"),
        (RULE_CASES[-7], "lone UTF-16 surrogate"),
    ):
        assert dll.send(handle, text)[0] == E_INVALID
        assert rule in dll.last_error(handle)[1], dll.last_error(handle)
    assert dll.send(handle, with_cell({"H1": 1, "cell_color": "x" * 65}))[0] == E_INVALID
    assert "$.data[0].TF_data[1].cell_color: must be at most 64" in dll.last_error(handle)[1]
    # Only the hub knows its max_rows: 501 rows pass the DLL (the hub says bad_schema).
    long = publish_text(data=table("EA1", "x")["data"] * 501)
    assert dll.send(handle, long)[0] in (QUEUED, COALESCED)


# ---- the bundle a trader installs --------------------------------------------------------------


def test_the_ea_bundle_is_reproducible_and_installs_as_a_data_folder(
    dll_build: Path, wine_env: dict[str, str], tmp_path: Path
) -> None:
    zips = []
    for name in ("first", "second"):  # two builds from scratch, in different folders
        build = tmp_path / name / "build"
        done = subprocess.run(
            ["make", "-C", str(MT5_DLL), "bundle", f"BUILD={build}"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"make bundle failed:\n{done.stdout}\n{done.stderr}"
        (found,) = build.glob("mt5hub-ea-*.zip")
        zips.append(found)
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and zips[0].name == f"mt5hub-ea-{version[1]}.zip"
    assert zips[0].read_bytes() == zips[1].read_bytes(), "two builds of one commit differ"

    with zipfile.ZipFile(zips[0]) as bundle:
        assert bundle.namelist() == [
            "MQL5/Libraries/mt5hub.dll",
            "MQL5/Include/Mt5Hub.mqh",
            "MQL5/Experts/Mt5HubSignals.mq5",
            "README.txt",
        ]
        dll_bytes = bundle.read("MQL5/Libraries/mt5hub.dll")
        readme = bundle.read("README.txt").decode()
        for source in ("mql5/Include/Mt5Hub.mqh", "mql5/Experts/Mt5HubSignals.mq5"):
            assert bundle.read("MQL5/" + source.split("/", 1)[1]) == (MT5_DLL / source).read_bytes()
        bundle.extractall(tmp_path / "data-folder")
    assert f"mt5hub.dll SHA-256: {hashlib.sha256(dll_bytes).hexdigest()}" in readme
    assert "File > Open Data Folder" in readme

    # The DLL from the bundle is one MT5 loads: the driver loads it from the unpacked folder.
    driver = subprocess.run(
        [
            WINE64,
            str(dll_build / "dlltest.exe"),
            str(tmp_path / "data-folder/MQL5/Libraries/mt5hub.dll"),
        ],
        input=b"version\nquit\n",
        env=wine_env,
        capture_output=True,
        timeout=120,
    )
    assert driver.stdout.decode().split() == ["ready", "ok", "1"], driver


# ---- certificate pinning ---------------------------------------------------------------------


def fingerprint_of(pem_path: Path) -> str:
    """The SHA-256 of a PEM certificate's DER, as openssl prints it: AB:CD:..."""
    der = ssl.PEM_cert_to_DER_cert(pem_path.read_text())
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


class KeepAliveServer:
    """A TLS server that answers every request 401 on a kept-alive connection and records the
    request heads per connection: what a client sent, and on which connection."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[list[str]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = self.listener.accept()
                heads: list[str] = []
                self.connections.append(heads)
                threading.Thread(target=self._talk, args=(raw, heads), daemon=True).start()

    def _talk(self, raw: socket.socket, heads: list[str]) -> None:
        with contextlib.suppress(OSError, ssl.SSLError), raw:
            conn = self.context.wrap_socket(raw, server_side=True)
            conn.settimeout(15)
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                heads.append(head.decode("latin-1"))
                conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")

    def __enter__(self) -> KeepAliveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self._thread.join(5)


def test_a_pinned_handle_accepts_exactly_its_certificate(
    hub: RunningHub, dll: DllTest, tmp_path: Path
) -> None:
    """The hub's certificate is from a CA Windows does not trust; pinned, it is accepted (and
    only it), without switching off checks for everyone else's certificates."""
    right = fingerprint_of(hub.folder / "hub.crt")
    assert f"WSS certificate SHA-256 fingerprint (an EA may pin it): {right}" in hub.log()
    wrong = right.replace(right[:2], "00" if right[:2] != "00" else "11", 1)
    with Viewer(hub) as viewer:
        pinned = dll.open_pinned(hub.wss_url + "/ws/dll", hub.token, right)
        other = dll.open_pinned(hub.wss_url + "/ws/dll", hub.token, wrong)
        # openssl's own output is accepted as it is, lower case and without colons too.
        also = dll.open_pinned(
            hub.wss_url + "/ws/dll", hub.token, "sha256 Fingerprint=" + right.lower()
        )
        bare = dll.open_pinned(hub.wss_url + "/ws/dll", hub.token, right.replace(":", ""))
        for handle in (pinned, also, bare):
            dll.wait_state(handle, CONNECTED)
        assert dll.send(pinned, table("EA1", "pinned", 4.0))[0] == QUEUED
        viewer.wait_for(lambda v: v.sum_of("EA1", "pinned") == 4.0, "the pinned handle's table")
        wait_until(lambda: "is not the pinned one" in dll.last_error(other)[1], "a pin mismatch")
        text = dll.last_error(other)[1]
        assert right in text and "the token was not sent" in text, text
        assert dll.stat(other, CONNECTS) == 0 and dll.status(other)[0] != CONNECTED
    for bad in ("", "AB:CD", right + ":00", right.replace("A", "G"), "x" * 64):
        assert dll.open_pinned(hub.wss_url + "/ws/dll", hub.token, bad or "-") == E_ARG, bad
    assert dll.open_pinned(hub.ws_url + "/ws/dll", hub.token, right) == E_URL  # TLS only


def test_the_token_goes_only_over_a_connection_whose_certificate_was_checked(
    dll: DllTest, tmp_path: Path, ca: Any
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert = ca.issue_cert("127.0.0.1")
    cert.configure_cert(context)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    right = fingerprint_of(tmp_path / "server.crt")
    wrong = "00:" + right[3:] if not right.startswith("00") else "11:" + right[3:]
    with KeepAliveServer(context) as server:
        url = f"wss://127.0.0.1:{server.port}/ws/dll"
        handle = dll.open_pinned(url, "secret-token", wrong)
        wait_until(lambda: "is not the pinned one" in dll.last_error(handle)[1], "a mismatch")
        assert dll.close(handle)[0] == 0
        wait_until(lambda: dll.threads() == 0, "the handle's thread to end")
        refused = list(server.connections)
        handle = dll.open_pinned(url, "secret-token", right)
        wait_until(lambda: dll.status(handle)[0] == REJECTED, "the 401 with the token")
        assert dll.close(handle)[0] == 0
    # Wrong certificate: requests went out, never with the token.
    assert refused and all(refused)
    assert not any("secret-token" in head for heads in refused for head in heads), refused
    # Right certificate: the first request on a new connection goes without the token; once the
    # certificate proved right, the next one on that same connection carries it.
    checked = [heads for heads in server.connections[len(refused) :] if heads]
    assert checked, server.connections
    for heads in checked:
        assert "secret-token" not in heads[0], heads
    assert any(
        len(heads) >= 2 and "Authorization: Bearer secret-token" in heads[1] for heads in checked
    ), checked


def test_make_dev_cert_prints_the_fingerprint_the_dll_pins(dll: DllTest, tmp_path: Path) -> None:
    openssl = require_tool("openssl", "makes the development certificate")
    assert openssl
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "make_dev_cert.sh"
    script.write_bytes((ROOT / "scripts" / "make_dev_cert.sh").read_bytes())
    printed = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    line = printed.stdout.strip().splitlines()[-1]
    assert line == f"local.crt SHA-256 fingerprint: {fingerprint_of(tmp_path / 'local.crt')}"
    fingerprint = line.rsplit(" ", 1)[1]
    assert dll.open_pinned("wss://127.0.0.1:1/ws/dll", "t", fingerprint) > 0
