#!/usr/bin/env python3
"""mt5hub against the seed's design (bench/seed_fastapi.py): the same load, one table.

    .venv/bin/python bench/compare.py                                  # 50, 200, 1000 viewers
    .venv/bin/python bench/compare.py --viewers 50,200 --seconds 10 --deflate --json

Why: the README's figures say what mt5hub does; this says what it does better than the design it
replaces (FastAPI, one list of clients, a `for` loop of `send_text`, plain uvicorn), on the same
machine, with the same load generator, in one run.

For each viewer count (`--viewers`) and share of stalled viewers (`--stalled-pct`: viewers that
connect and never read), it starts the baseline (`uvicorn bench.seed_fastapi:app`, one process)
and then mt5hub (`hypercorn --config hub.toml mt5hub:app` with a generated hub.toml like
scripts/bench_backplane.py's: 1 worker, plain WS, generous publisher rate limits), each on a free
loopback port in a temporary directory, and runs `scripts/fake_dll.py load -p 10 -r 10 --procs 2
--seconds S --json` against it (publishers and viewers in their own processes; `--deflate` makes
the viewers offer permessage-deflate, which both servers accept). Measured per run: updates
delivered within the measured window, deliveries/s (and the unconflated expectation), end-to-end
latency p50/p99/max, freshness p50/p99 (the age, at the end of the window, of the newest state
each healthy viewer holds per table: a viewer holding nothing counts as old as the whole run),
RSS of the server's process tree (/proc) before the load, at its peak and after, and the CPU
seconds the tree used during the load (and, in brackets, what the rest of the machine used
meanwhile besides the load generator: a busy neighbour shows there).

The table ends each (viewers, stalled) group with a ratio row: mt5hub/baseline for updates
delivered and deliveries/s, baseline/mt5hub for latency, freshness and RSS after: above 1, mt5hub
is better. Ports, process groups and the wait for /healthz come from mt5hub.testing.launcher;
/proc sampling and the log grep from scripts/bench_backplane.py. Loopback only, bounded: fake_dll
bounds its clients and time, every subprocess has a timeout, and each server is stopped (SIGTERM,
then SIGKILL of its process group) after its run, on an error, and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench_backplane as bb  # noqa: E402  (scripts/ is not a package)

from mt5hub.testing.launcher import (  # noqa: E402
    free_port,
    hub_env,
    hypercorn_command,
    spawn,
    stop_group,
    wait_ready,
)

SERVERS = ("baseline", "mt5hub")
LOAD_SLACK = 60.0  # fake_dll's own bounds, then this much, before it is killed


def start_server(server: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    env = hub_env(MT5_TOKEN=bb.TOKEN)
    bindir = Path(sys.executable).parent
    if server == "baseline":  # plain uvicorn: its defaults (websockets, permessage-deflate)
        command = [str(bindir / "uvicorn"), "bench.seed_fastapi:app"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        cwd = REPO
    else:
        (workdir / "hub.toml").write_text(bb.bench_hub_toml("mt5hub", 1, port, ""))
        command = hypercorn_command()
        cwd = workdir
    return spawn(command, cwd=cwd, env=env, log=workdir / "server.log")


def run_one(
    server: str, viewers: int, stalled: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One server, one load: start it, measure it, stop it."""
    port = free_port()
    log = workdir / "server.log"
    load_args = argparse.Namespace(**vars(args))
    load_args.viewers, load_args.stalled = viewers, stalled
    command = bb.load_command(load_args, port) + (["--deflate"] if args.deflate else [])
    proc: subprocess.Popen[bytes] | None = None
    load: subprocess.Popen[str] | None = None
    sampler: bb.Sampler | None = None
    try:
        proc = start_server(server, port, workdir)
        # the baseline has no /healthz: any answer (a 404) will do
        wait_ready(proc, port, timeout=bb.STARTUP_TIMEOUT, log=log, any_answer=server == "baseline")
        time.sleep(1.0)  # let it settle
        rss_before, cpu_before = bb.tree_rss(proc.pid), bb.tree_cpu(proc.pid)
        sampler = bb.Sampler(proc.pid, port)  # peak RSS (its /healthz polls fail quietly here)
        sampler.start()
        reaped_before, (busy_before, _) = bb.children_cpu(), bb.system_busy()
        started = time.monotonic()
        load = spawn(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        limit = bb.CONNECT_TIME + args.warmup + args.seconds + LOAD_SLACK
        try:
            out, err = load.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"fake_dll load took over {limit:g} s") from None
        wall = time.monotonic() - started
        cpu = bb.cpu_delta(cpu_before, bb.tree_cpu(proc.pid))
        loadgen_cpu = bb.children_cpu() - reaped_before
        other_cpu = bb.system_busy()[0] - busy_before - cpu - loadgen_cpu  # e.g. a neighbour
        sampler.halt.set()
        sampler.join()
        time.sleep(1.0)  # the viewers' sockets are closed: let the server let go of them
        rss_after = bb.tree_rss(proc.pid)
        if load.returncode != 0:
            raise RuntimeError(f"fake_dll load exited with {load.returncode}: {err.strip()}")
        return {
            "server": server,
            "viewers": viewers,
            "stalled": stalled,
            "load": json.loads(out.strip().splitlines()[-1]),
            "load_stderr": err.strip().splitlines(),
            "rss_mb": {
                "before": round(rss_before / 2**20, 1),
                "peak": round(max(sampler.peak_rss, rss_before, rss_after) / 2**20, 1),
                "after": round(rss_after / 2**20, 1),
            },
            "cpu_s": round(cpu, 2),
            "loadgen_cpu_s": round(loadgen_cpu, 2),
            "other_cpu_s": round(other_cpu, 2),
            "load_wall_s": round(wall, 1),
        }
    finally:
        if sampler is not None:
            sampler.halt.set()
        if load is not None and load.poll() is None:
            stop_group(load, "fake_dll")
        stop_group(proc, server)


# -- the report ---------------------------------------------------------------------------------


def number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:g}"


def ratio(top: float | None, bottom: float | None) -> str:
    if top is None or bottom is None or math.isnan(top) or math.isnan(bottom):
        return "-"
    if bottom == 0:
        return "-" if top == 0 else "inf"
    return f"{top / bottom:.2f}x"


def table(results: Sequence[dict[str, Any]]) -> str:
    head = (
        "| viewers (stalled) | server | updates delivered | deliveries/s (expected) "
        "| latency p50 ms | p99 ms | max ms | freshness p50 ms | p99 ms "
        "| RSS MB before->after (peak) | CPU s (rest of machine) |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    groups: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["viewers"], result["stalled"]), {})[result["server"]] = result
    for (viewers, stalled), by_server in groups.items():
        label = f"{viewers} ({stalled})"
        for server in SERVERS:
            r = by_server.get(server)
            if r is None:
                continue
            if "error" in r:
                rows.append(f"| {label} | {server} | failed: {r['error'][:120]} |")
                continue
            x, rss = r["load"], r["rss_mb"]
            lat, fresh = x["latency_ms"], x["freshness_ms"]
            rows.append(
                f"| {label} | {server} | {x['updates_delivered']} "
                f"| {x['deliveries_per_s']:g} ({x['expected_deliveries_per_s']:g}) "
                f"| {number(lat['p50'])} | {number(lat['p99'])} | {number(lat['max'])} "
                f"| {number(fresh['p50'])} | {number(fresh['p99'])} "
                f"| {rss['before']:g} -> {rss['after']:g} ({rss['peak']:g}) "
                f"| {r['cpu_s']:g} ({r['other_cpu_s']:g}) |"
            )
        base, hub = by_server.get("baseline"), by_server.get("mt5hub")
        if base and hub and "error" not in base and "error" not in hub:
            b, h = base["load"], hub["load"]
            rows.append(
                f"| {label} | **ratio** | {ratio(h['updates_delivered'], b['updates_delivered'])} "
                f"| {ratio(h['deliveries_per_s'], b['deliveries_per_s'])} "
                + "".join(
                    f"| {ratio(b['latency_ms'][q], h['latency_ms'][q])} "
                    for q in ("p50", "p99", "max")
                )
                + "".join(
                    f"| {ratio(b['freshness_ms'][q], h['freshness_ms'][q])} "
                    for q in ("p50", "p99")
                )
                + f"| {ratio(base['rss_mb']['after'], hub['rss_mb']['after'])} | |"
            )
    return "\n".join(rows)


LEGEND = (
    "ratio rows: mt5hub/baseline for updates delivered and deliveries/s; baseline/mt5hub for "
    "latency, freshness and RSS after (above 1: mt5hub is better). Freshness: age of the newest "
    "state each healthy viewer holds per table at the end of the window."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--viewers", default="50,200,1000", help="viewer counts, comma-separated")
    parser.add_argument(
        "--stalled-pct", default="0,10", help="percentages of viewers that never read"
    )
    parser.add_argument("-p", "--publishers", type=int, default=10)
    parser.add_argument("-r", "--rate", type=float, default=10.0, help="publishes/s per publisher")
    parser.add_argument("--procs", type=int, default=2, help="processes for the viewers")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--deflate", action="store_true", help="viewers offer permessage-deflate")
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and server logs")
    args = parser.parse_args(argv)
    try:
        counts = [int(v) for v in args.viewers.split(",")]
        shares = [float(v) for v in args.stalled_pct.split(",")]
    except ValueError:
        parser.error("--viewers and --stalled-pct take comma-separated numbers")
    if not all(v > 0 for v in counts) or not all(0 <= s < 100 for s in shares):
        parser.error("viewer counts must be positive, stalled percentages in 0..99")
    results: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="mt5hub-compare-"))
    try:
        with bb.sigterm_as_exit():
            for viewers in counts:
                for share in shares:
                    stalled = round(viewers * share / 100)
                    for server in SERVERS:
                        workdir = root / f"{server}-{viewers}-{stalled}"
                        workdir.mkdir()
                        print(
                            f"== {server}: {args.publishers} x {args.rate:g}/s -> {viewers} "
                            f"viewers ({stalled} stalled), {args.seconds:g} s"
                            + (", deflate" if args.deflate else ""),
                            file=sys.stderr,
                            flush=True,
                        )
                        try:
                            result = run_one(server, viewers, stalled, args, workdir)
                        except (RuntimeError, OSError, ValueError) as exc:
                            result = {
                                "server": server,
                                "viewers": viewers,
                                "stalled": stalled,
                                "error": str(exc),
                            }
                            print(f"   failed: {exc}", file=sys.stderr)
                        result["server_log"] = {"path": str(workdir / "server.log")}
                        result["server_log"].update(bb.grep_log(workdir / "server.log"))
                        results.append(result)
                        report(result)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return bb.finish(results, args, root, lambda rows: f"{table(rows)}\n\n{LEGEND}")


def report(result: dict[str, Any]) -> None:
    """Progress on stderr: what fake_dll and the server's log said, then the headline."""
    bb.report_logs(result, "server_log", "server log")
    with contextlib.suppress(KeyError):
        x = result["load"]
        print(
            f"   {x['deliveries_per_s']:g}/s delivered, p99 {x['latency_ms']['p99']} ms, "
            f"freshness p99 {x['freshness_ms']['p99']} ms, mean {x['mean_latency_ms']} ms"
            + (f" (in the hub {hub} ms)" if (hub := x.get("hub_mean_latency_ms")) else "")
            + f", {x['publishers_cut_off']} publishers cut off, "
            f"{x['viewers_closed']} viewers closed",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
