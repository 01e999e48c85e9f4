"""A real hub in a subprocess: a generated hub.toml, ready once /healthz answers, always stopped.

`HubProcess` runs `hypercorn --config hub.toml mt5hub:app` in a folder of its own, exactly as the
README does, and waits until `/healthz` has answered from every worker. `stop()` is SIGTERM (as
systemd or Ctrl-C) and then SIGKILL of the process group.

Children never outlive the process that started them, however it ends: every child started by
`spawn` is a process group of its own (so one signal reaches Hypercorn's workers too), is killed
by an `atexit` hook at a normal exit, and gets SIGTERM from the kernel when its parent dies
(PR_SET_PDEATHSIG), even by SIGKILL. The kernel sends that signal when the *thread* that forked
the child ends, so children are forked from one thread that lives as long as the process, not
from whichever thread (e.g. trio's `to_thread`) asked for them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
# Secrets and paths from the environment would override the generated hub.toml: drop them.
HUB_ENV = (
    "MT5HUB_CONFIG",
    "MT5HUB_TOKENS",
    "MT5HUB_VIEWER_TOKENS",
    "MT5HUB_BACKPLANE",
    "MT5HUB_STATE_FILE",
    "MT5HUB_STATUS_TOKEN",
)
_PR_SET_PDEATHSIG = 1

_forker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mt5hub-testing-spawn")
_running: dict[int, subprocess.Popen[Any]] = {}  # pid: child, until it is stopped


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    command: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start `command` as a process group of its own that dies with this process.

    Output goes to `log` (appended) unless `popen` says otherwise (e.g. `stdout=PIPE`).
    """
    if log is not None:
        with open(log, "ab") as out:  # the child keeps its own copy of the fd
            return spawn(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, **popen)
    popen.setdefault("stdin", subprocess.DEVNULL)

    def fork() -> subprocess.Popen[Any]:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **popen,
        )

    proc = _forker.submit(fork).result()
    _running[proc.pid] = proc
    return proc


def stop_group(
    proc: subprocess.Popen[Any] | None,
    name: str = "child",
    timeout: float = 10.0,
    *,
    term_leader_only: bool = False,
) -> int | None:
    """SIGTERM the process group `proc` leads (or only `proc`, as systemd's KillMode=mixed
    does), SIGKILL the group if it lingers; the exit code."""
    if proc is None:
        return None
    _running.pop(proc.pid, None)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGTERM and term_leader_only:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{name} (pid {proc.pid}) ignored {sig.name}", file=sys.stderr)
    # The leader may be gone while its workers live on: make sure of the rest.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()
    return proc.returncode


def kill_group(proc: subprocess.Popen[Any] | None) -> None:
    """SIGKILL the process group at once (a crash: no goodbye to anyone)."""
    if proc is None:
        return
    _running.pop(proc.pid, None)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running.values()):
        kill_group(proc)


def hub_env(**extra: str) -> dict[str, str]:
    """This environment, with the repo importable and no MT5HUB_* variables."""
    env = {k: v for k, v in os.environ.items() if k not in HUB_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def toml_value(value: Any) -> str:
    """A TOML value: JSON's strings, numbers and booleans are valid TOML; inf is not; lists and
    tables are written item by item (a table inline: `{token = "...", keys = ["EA1"]}`)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def hub_toml(
    top: Mapping[str, Any],
    hub: Mapping[str, Any],
    tokens: Sequence[Mapping[str, Any]] = (),
    comment: str = "",
) -> str:
    """hub.toml's text: Hypercorn's keys, the [mt5hub] table, and [[mt5hub.tokens]] entries."""
    lines = [f"# {comment}"] if comment else []
    lines += [f"{key} = {toml_value(value)}" for key, value in top.items()]
    lines += ["", "[mt5hub]", *(f"{key} = {toml_value(value)}" for key, value in hub.items())]
    for grant in tokens:
        lines += ["", "[[mt5hub.tokens]]", *(f"{k} = {toml_value(v)}" for k, v in grant.items())]
    return "\n".join(lines) + "\n"


def healthz(port: int, timeout: float = 5.0, token: str = "") -> dict[str, Any]:
    """GET /healthz on loopback, parsed; with the hub's `status_token`, if it needs one."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


def wait_ready(
    proc: subprocess.Popen[Any],
    port: int,
    workers: int = 1,
    timeout: float = 30.0,
    log: Path | None = None,
    *,
    any_answer: bool = False,
    token: str = "",
) -> None:
    """Until /healthz on `port` has answered from every worker (each answer comes from one of
    them; after `timeout`, go on if some have), or with `any_answer` until any HTTP answer comes
    (a server without /healthz). Fails, with the log, if `proc` exits first or nothing answers."""
    deadline = time.monotonic() + timeout
    pids: set[int] = set()
    while len(pids) < workers:
        if proc.poll() is not None:
            raise RuntimeError(f"hub exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            if pids:
                print(f"only saw {len(pids)} of {workers} workers answer", file=sys.stderr)
                return
            raise RuntimeError(f"nothing answered /healthz within {timeout} s:\n{_tail(log)}")
        try:
            pids.add(int(healthz(port, timeout=2.0, token=token)["pid"]))
        except (OSError, ValueError, KeyError) as exc:  # not listening yet: wait, ask again
            if any_answer and isinstance(exc, urllib.error.HTTPError):
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.05)


def _tail(log: Path | None, lines: int = 60) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def hypercorn_command() -> list[str]:
    """`hypercorn --config hub.toml mt5hub:app`, with this interpreter's Hypercorn."""
    return [sys.executable, "-m", "hypercorn", "--config", "hub.toml", "mt5hub:app"]


class HubProcess:
    """A hub on loopback in `folder` (which holds its hub.toml); answers /healthz on `port`.

    stop/start/restart keep the folder, its files and the ports.
    """

    def __init__(self, folder: Path, port: int, workers: int = 1, pythonpath: str = "") -> None:
        self.folder = folder
        self.port = port
        self.workers = workers
        self.pythonpath = pythonpath  # a folder put before the checkout on PYTHONPATH
        self.status_token = ""  # plain: what /healthz needs from loopback (status_access)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "hub.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def spawn(self) -> None:
        """Start Hypercorn (again, in the same folder and on the same ports); do not wait."""
        assert self.process is None or self.process.poll() is not None, "already running"
        env = hub_env()
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([self.pythonpath, env["PYTHONPATH"]])
        self.process = spawn(hypercorn_command(), cwd=self.folder, env=env, log=self.log_path)

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        wait_ready(
            self.process, self.port, self.workers, timeout, self.log_path, token=self.status_token
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to Hypercorn's master, as systemd would, then wait (past `timeout`, SIGKILL to
        the group); the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        return stop_group(self.process, "hypercorn", timeout, term_leader_only=True)

    def kill(self) -> None:
        """SIGKILL to the whole process group: a crash."""
        if self.process is not None and self.process.poll() is None:
            kill_group(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, str]:
        """GET over plain HTTP: the status and the body, for any status."""
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            request = urllib.request.Request(url, headers=dict(headers or {}))
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def health(self) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {self.status_token}"} if self.status_token else {}
        return json.loads(self.get("/healthz", auth)[1])  # type: ignore[no-any-return]
