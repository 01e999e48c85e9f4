#!/usr/bin/env python3
"""Benchmark the Redis backplane: one worker alone, one worker on Redis, two workers on Redis.

    .venv/bin/python scripts/bench_backplane.py                        # all three scenarios
    .venv/bin/python scripts/bench_backplane.py local-1 redis-2 -v 200 --seconds 10 --json

For each scenario it writes a hub.toml into a temporary directory (the repo's hub.toml in shape:
trio workers, a plain WS bind on a free loopback port, generous publisher rate limits), starts
its own `redis-server` (once, on a free loopback port, no persistence; flushed between scenarios)
and `hypercorn --config hub.toml mt5hub:app`, waits for /healthz, then runs
`scripts/fake_dll.py load ... --json` against it and stops everything again (SIGTERM, then SIGKILL
of each process group), also on Ctrl-C or an error.

Scenarios:
    local-1   workers = 1, no backplane (the baseline)
    redis-1   workers = 1, backplane = redis://...
    redis-2   workers = 2, backplane = redis://...  (the scale-out target)

Measured per scenario: published/s and delivered/s (and the unconflated expectation), end-to-end
latency p50/p99/max and seq gaps (from fake_dll); hub RSS summed over the whole hypercorn process
tree (parent and workers, VmRSS from /proc) before the load, at its peak and after; CPU seconds
(utime + stime) that the hub tree, redis-server and the load generator used during the load
(together at most cores x wall time: on a small machine they compete), and what the rest of the
machine used meanwhile (/proc/stat: a disturbed run shows there); viewers per worker
(sampled from /healthz, which one worker answers each time); delivered/s relative to `local-1`.
fake_dll's own hub figures (RSS, conflated/dropped counters, "viewers connected") come from one
worker only, so with several workers this script's /proc figures are the ones to read.

Load options pass through to fake_dll (`-p -r -v --stalled --procs --seconds --warmup`). Loopback
only, bounded: fake_dll limits time and clients, and every subprocess here has a timeout.
A markdown table is printed at the end; `--json` prints the raw results before it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mt5hub.testing.launcher import (
    HubProcess,
    free_port,
    healthz,
    hub_env,
    hub_toml,
    spawn,
    stop_group,
)

REPO = Path(__file__).resolve().parent.parent
FAKE_DLL = REPO / "scripts" / "fake_dll.py"
SCENARIOS: dict[str, tuple[int, bool]] = {  # name: (workers, backplane)
    "local-1": (1, False),
    "redis-1": (1, True),
    "redis-2": (2, True),
}
TOKEN = "supersecret123"  # the seed's default token: accepted because every bind is loopback
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONNECT_TIME = 5.0  # fake_dll's viewer connection phase
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_PATTERN = re.compile(r"WARNING|ERROR|CRITICAL|Traceback")

BENCH_SETTINGS: dict[str, Any] = {  # [mt5hub] of the generated hub.toml, but the backplane
    "ping_interval": 10.0,
    "publisher_timeout": 30.0,
    "viewer_timeout": 30.0,
    "viewer_buffer": 64,
    "slow_viewer_timeout": 10.0,
    "viewer_send_buffer": 262144,
    "rate_limit": 10000.0,  # generous: the benchmark sets the rate, not the limiter
    "rate_burst": 20000,
    "flood_seconds": 5.0,
    "max_rows": 500,
    "max_viewers": 10000,  # the load generator's viewers all come from 127.0.0.1
    "max_viewers_per_ip": 10000,
    "allowed_origins": [],
    "viewer_tokens": [],
    "backplane_prefix": "mt5hub-bench",
    "backplane_heartbeat": 2.0,
    "backplane_ttl": 10.0,
    "backplane_timeout": 5.0,
    "state_file": "",  # the fan-out is measured, not the saver's disk writes
}


def bench_hub_toml(name: str, workers: int, port: int, backplane: str) -> str:
    """The hub.toml of a benchmark run: trio workers, plain WS on loopback, generous limits."""
    top = {
        "worker_class": "trio",
        "workers": workers,
        "bind": [f"127.0.0.1:{port}"],  # plain WS/HTTP: no certfile
        "websocket_max_message_size": 1048576,
        "graceful_timeout": 2.0,
        "backlog": 1024,  # a thousand viewers connect within seconds
        "accesslog": "-",
        "errorlog": "-",
    }
    hub = {**BENCH_SETTINGS, "backplane": backplane}
    tokens = [{"token": TOKEN, "keys": ["*"], "name": "bench"}]
    return hub_toml(top, hub, tokens, f"Written by scripts/bench_backplane.py for {name}.")


# -- processes ----------------------------------------------------------------------------------


def redis_call(port: int, *command: str, timeout: float = 5.0) -> bytes:
    """One RESP command over a fresh connection; returns the raw first reply line."""
    payload = f"*{len(command)}\r\n".encode()
    for part in command:
        payload += f"${len(part.encode())}\r\n{part}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.strip()


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (Debian package redis-server)")
    port = free_port()
    command = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    proc = spawn(command, log=workdir / "redis.log")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            if redis_call(port, "PING", timeout=1.0) == b"+PONG":
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc, "redis-server")
            raise SystemExit(f"redis-server did not start; see {workdir / 'redis.log'}")
        time.sleep(0.1)


# -- /proc --------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(c) for c in text.split())
    return found


def tree(pid: int) -> list[int]:
    """pid and all its descendants that are alive now."""
    if not Path(f"/proc/{pid}").exists():
        return []
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children(p))
    return pids


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its own threads; not its children's)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is state
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # stat fields 14 and 15


def tree_rss(pid: int) -> int:
    return sum(rss_bytes(p) for p in tree(pid))


def tree_cpu(pid: int) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in tree(pid)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two samples; a process new in `after` counts from zero."""
    return sum(t - before.get(p, 0.0) for p, t in after.items())


def system_busy() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine (all cores) and the steal among them, /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


def children_cpu() -> float:
    """CPU of every descendant this process has reaped (fake_dll reaps its own workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Sampler(threading.Thread):
    """During the load: peak tree RSS, and viewers per worker as /healthz reports them."""

    def __init__(self, hub_pid: int, port: int, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.hub_pid, self.port, self.period = hub_pid, port, period
        self.peak_rss = 0
        self.viewers: dict[int, int] = {}  # worker pid: most viewers seen on it
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period):
            self.peak_rss = max(self.peak_rss, tree_rss(self.hub_pid))
            with contextlib.suppress(OSError, ValueError, KeyError):
                h = healthz(self.port, timeout=2.0)
                pid = int(h["pid"])
                self.viewers[pid] = max(self.viewers.get(pid, 0), int(h["viewers"]))


# -- one scenario -------------------------------------------------------------------------------


def load_command(args: argparse.Namespace, port: int) -> list[str]:
    return [
        sys.executable, str(FAKE_DLL), "load", "--url", f"ws://127.0.0.1:{port}",
        "--token", TOKEN, "-p", str(args.publishers), "-r", str(args.rate),
        "-v", str(args.viewers), "--stalled", str(args.stalled), "--procs", str(args.procs),
        "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--json",
    ]  # fmt: skip


def grep_log(path: Path, limit: int = 8) -> dict[str, Any]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"count": 0, "lines": []}
    hits = [line for line in lines if LOG_PATTERN.search(line)]
    first: list[str] = []
    for line in hits:  # a few distinct ones, without the timestamps
        text = re.sub(r"^\S+ \S+ ", "", line)[:200]
        if text not in first:
            first.append(text)
        if len(first) >= limit:
            break
    return {"count": len(hits), "lines": first}


def run_scenario(
    name: str, args: argparse.Namespace, redis_port: int | None, workdir: Path
) -> dict[str, Any]:
    workers, use_backplane = SCENARIOS[name]
    if use_backplane:
        assert redis_port is not None
        redis_call(redis_port, "FLUSHALL")  # no seqs, claims or dead hubs from the last scenario
    port = free_port()
    backplane = f"redis://127.0.0.1:{redis_port}/0" if use_backplane else ""
    (workdir / "hub.toml").write_text(bench_hub_toml(name, workers, port, backplane))
    hub = HubProcess(workdir, port, workers)
    load: subprocess.Popen[str] | None = None
    sampler: Sampler | None = None
    try:
        hub.start(STARTUP_TIMEOUT)
        assert hub.process is not None
        time.sleep(1.0)  # let the workers settle (imports, Redis connections)
        hub_pid = hub.process.pid
        rss_before = tree_rss(hub_pid)
        cpu_before = tree_cpu(hub_pid)
        redis_cpu_before = cpu_seconds(args.redis_pid) if use_backplane else 0.0
        sampler = Sampler(hub_pid, port)
        sampler.start()
        started = time.monotonic()
        reaped_before = children_cpu()
        busy_before, steal_before = system_busy()
        load = spawn(
            load_command(args, port), cwd=REPO, env=hub_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        limit = CONNECT_TIME + args.warmup + args.seconds + 120
        try:
            out, err = load.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"fake_dll load took over {limit:g} s") from None
        wall = time.monotonic() - started
        load_cpu = children_cpu() - reaped_before  # fake_dll and its viewer processes
        busy_after, steal_after = system_busy()
        cpu_after = tree_cpu(hub_pid)
        redis_cpu_after = cpu_seconds(args.redis_pid) if use_backplane else 0.0
        sampler.halt.set()
        sampler.join()
        time.sleep(1.0)  # viewers' sockets closed: let the hub let go of them
        rss_after = tree_rss(hub_pid)
        if load.returncode != 0:
            raise RuntimeError(f"fake_dll load exited with {load.returncode}: {err.strip()}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        hub_cpu = cpu_delta(cpu_before, cpu_after)
        redis_cpu = redis_cpu_after - redis_cpu_before
        other_cpu = busy_after - busy_before - hub_cpu - redis_cpu - load_cpu
        return {
            "scenario": name,
            "workers": workers,
            "backplane": use_backplane,
            "load": result,
            "load_stderr": err.strip().splitlines(),
            "hub_tree_rss_mb": {
                "before": round(rss_before / 2**20, 1),
                "peak": round(max(sampler.peak_rss, rss_before) / 2**20, 1),
                "after": round(rss_after / 2**20, 1),
            },
            "hub_cpu_s": round(hub_cpu, 2),
            "redis_cpu_s": round(redis_cpu, 2),
            "load_wall_s": round(wall, 1),
            "loadgen_cpu_s": round(load_cpu, 2),
            "other_cpu_s": round(other_cpu, 2),  # the rest of the machine: a disturbance shows here
            "steal_cpu_s": round(steal_after - steal_before, 2),
            "cpus": os.cpu_count(),
            "viewers_per_worker": sorted(sampler.viewers.values(), reverse=True),
        }
    finally:
        if sampler is not None:
            sampler.halt.set()
        if load is not None and load.poll() is None:
            stop_group(load, "fake_dll")
        hub.stop(STOP_TIMEOUT)


# -- the report ---------------------------------------------------------------------------------


def table(results: Sequence[dict[str, Any]]) -> str:
    base = next((r for r in results if r["scenario"] == "local-1" and "load" in r), None)
    head = (
        "| scenario | workers | backplane | published/s | delivered/s (expected) "
        "| p50 ms | p99 ms | max ms | seq gaps | hub RSS MB before->after (peak) "
        "| CPU s hub/redis/loadgen/other | wall s | viewers/worker | vs local-1 |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['scenario']} | failed: {r['error']} |")
            continue
        x, lat, rss = r["load"], r["load"]["latency_ms"], r["hub_tree_rss_mb"]
        ratio = "-"
        if base is not None and base["load"]["deliveries_per_s"]:
            ratio = f"{x['deliveries_per_s'] / base['load']['deliveries_per_s']:.2f}x"
        per_worker = "/".join(str(v) for v in r["viewers_per_worker"]) or "?"
        rows.append(
            f"| {r['scenario']} | {r['workers']} | {'redis' if r['backplane'] else '-'} "
            f"| {x['published_per_s']:g} | {x['deliveries_per_s']:g} "
            f"({x['expected_deliveries_per_s']:g}) | {lat['p50']:g} | {lat['p99']:g} "
            f"| {lat['max']:g} | {x['seq_gaps']} "
            f"| {rss['before']:g} -> {rss['after']:g} ({rss['peak']:g}) "
            f"| {r['hub_cpu_s']:g} / {r['redis_cpu_s']:g} / {r['loadgen_cpu_s']:g} "
            f"/ {r['other_cpu_s']:g} | {r['load_wall_s']:g} | {per_worker} | {ratio} |"
        )
    return "\n".join(rows)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C does, so the finally blocks stop every child."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("-p", "--publishers", type=int, default=10)
    parser.add_argument("-r", "--rate", type=float, default=10.0, help="publishes/s per publisher")
    parser.add_argument("-v", "--viewers", type=int, default=1000)
    parser.add_argument("--stalled", type=int, default=0, help="viewers that never read")
    parser.add_argument("--procs", type=int, default=2, help="processes for the viewers")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs and their logs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    names = list(dict.fromkeys(args.scenarios or SCENARIOS))
    results: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="mt5hub-bench-"))
    redis: subprocess.Popen[bytes] | None = None
    try:
        with sigterm_as_exit():
            redis_port = None
            if any(SCENARIOS[n][1] for n in names):
                redis, redis_port = start_redis(root)
            args.redis_pid = redis.pid if redis else 0
            for name in names:
                workdir = root / name
                workdir.mkdir()
                print(f"== {name}: {args.publishers} x {args.rate:g}/s -> {args.viewers} "
                      f"viewers, {args.seconds:g} s", file=sys.stderr, flush=True)  # fmt: skip
                try:
                    result = run_scenario(name, args, redis_port, workdir)
                except (RuntimeError, OSError, ValueError) as exc:
                    result = {"scenario": name, "error": str(exc)}
                    print(f"   failed: {exc}", file=sys.stderr)
                result["hub_log"] = {"path": str(workdir / "hub.log")}
                result["hub_log"].update(grep_log(workdir / "hub.log"))
                results.append(result)
                report_logs(result, "hub_log", "hub log")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        stop_group(redis, "redis-server")
    return finish(results, args, root, table)


def report_logs(result: dict[str, Any], key: str, name: str) -> None:
    """Progress on stderr: what fake_dll printed and what the server's log warned about."""
    for line in result.get("load_stderr", []):
        print(f"   fake_dll: {line}", file=sys.stderr)
    log = result[key]
    print(f"   {name}: {log['count']} WARNING/ERROR/Traceback lines", file=sys.stderr)
    for line in log["lines"]:
        print(f"     {line}", file=sys.stderr)


def finish(
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    root: Path,
    render: Callable[[Sequence[dict[str, Any]]], str],
) -> int:
    """Keep or remove the temp dir, print the results; the exit status (1 if a run failed)."""
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    if results:
        print(render(results))
    return 0 if results and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
