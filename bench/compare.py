#!/usr/bin/env python3
"""mt5hub against the seed's design (bench/seed_fastapi.py): the same load, one table.

    .venv/bin/python bench/compare.py                                  # 50, 200, 1000 viewers
    .venv/bin/python bench/compare.py --viewers 50,200 --seconds 10 --deflate --json
    .venv/bin/python bench/compare.py --servers mt5hub --schemes ws,wss --deflate --repeat 3

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

`--schemes ws,wss` runs each server over plain WebSockets and over TLS (a trustme certificate the
load generator trusts; mt5hub's TLS bind offers HTTP/1.1 only, as hub.toml ships; the baseline
runs uvicorn with --ssl-certfile), `--repeat N` interleaves N rounds of every (server, scheme) pair
so that a drift of the machine shows as spread, not as a difference. The hub CPU per delivery
column divides the server's CPU seconds by the updates it delivered; the window columns count only
the CPU used within fake_dll's measured window (sampled every 0.2 s), without the viewers'
handshakes and snapshots before it and their closes after, which weigh on a light load.
`--viewing all,delta,one` runs mt5hub's viewers as v1 viewers of every table, as delta viewers
(protocol v1.1 patches), or each subscribed to one table; the wire column is the bytes the
viewers read off their sockets per delivery.

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
import itertools
import json
import math
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
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

SERVERS = ("baseline", "before", "mt5hub")  # before: mt5hub from --before's checkout
# What the viewers ask for (protocol v1.1): every table whole (v1), patches, or one table each
VIEWING = {"all": [], "delta": ["--delta"], "one": ["--subscribe", "one"]}
BEFORE: list[str] = []  # the checkout of `before`, set by main
LOAD_SLACK = 60.0  # fake_dll's own bounds, then this much, before it is killed


def wait_for_https(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until the baseline over TLS answers HTTPS at all (it has no /healthz: a 404 will do)."""
    deadline = time.monotonic() + bb.STARTUP_TIMEOUT
    url = f"https://127.0.0.1:{port}/healthz"
    context = ssl._create_unverified_context()  # only: is it up yet?
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=context):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered on port {port}; see {log}") from None
            time.sleep(0.2)


TLS_LINES = """\
certfile = "hub.crt"
keyfile = "hub.key"
alpn_protocols = ["http/1.1"]
insecure_bind = ["127.0.0.1:{health_port}"]  # /healthz for the launcher, in plain HTTP
"""


def write_certificate(workdir: Path) -> Path:
    """hub.crt/hub.key for 127.0.0.1 from a fresh trustme CA; the CA's file, for the clients."""
    import trustme  # only with --schemes wss (a test and bench dependency)

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(workdir / "hub.key"))
    cert.cert_chain_pems[0].write_to_path(str(workdir / "hub.crt"))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return workdir / "ca.pem"


def start_server(
    server: str, port: int, workdir: Path, health_port: int | None = None
) -> subprocess.Popen[bytes]:
    """The server on `port`; with `health_port`, over TLS on `port` (hub.crt in `workdir`) and,
    for mt5hub, plain HTTP on `health_port` for the launcher's /healthz."""
    env = hub_env(MT5_TOKEN=bb.TOKEN)
    if server == "before":  # its mt5hub first on the path
        env["PYTHONPATH"] = os.pathsep.join([*BEFORE, env["PYTHONPATH"]])
    bindir = Path(sys.executable).parent
    if server == "baseline":  # plain uvicorn: its defaults (websockets, permessage-deflate)
        command = [str(bindir / "uvicorn"), "bench.seed_fastapi:app"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        if health_port is not None:
            command += ["--ssl-certfile", str(workdir / "hub.crt")]
            command += ["--ssl-keyfile", str(workdir / "hub.key")]
        cwd = REPO
    else:
        toml = bb.bench_hub_toml("mt5hub", 1, port, "")
        if health_port is not None:
            head, _, rest = toml.partition("[mt5hub]")
            toml = head + TLS_LINES.format(health_port=health_port) + "\n[mt5hub]" + rest
        (workdir / "hub.toml").write_text(toml)
        command = hypercorn_command()
        cwd = workdir
    return spawn(command, cwd=cwd, env=env, log=workdir / "server.log")


class CpuTrace(threading.Thread):
    """The server tree's CPU seconds, sampled every `period`: what it used within the load's
    measured window (without the viewers' handshakes before it and their goodbyes after)."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []  # (wall clock, CPU seconds)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period):
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.time(), sum(bb.tree_cpu(self.pid).values())))

    def at(self, when: float) -> float | None:
        """CPU seconds at this time, between the samples around it."""
        for (t0, c0), (t1, c1) in itertools.pairwise(self.samples):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c0
        return None

    def within(self, window: Sequence[float]) -> float | None:
        start, end = self.at(window[0]), self.at(window[1])
        return None if start is None or end is None else end - start


def run_one(
    server: str,
    scheme: str,
    viewers: int,
    stalled: int,
    args: argparse.Namespace,
    workdir: Path,
    viewing: str = "all",
) -> dict[str, Any]:
    """One server, one load: start it, measure it, stop it."""
    port = free_port()
    log = workdir / "server.log"
    load_args = argparse.Namespace(**vars(args))
    load_args.viewers, load_args.stalled = viewers, stalled
    command = [*bb.load_command(load_args, port), "--change", str(args.change)]
    command += ["--deflate"] if args.deflate else []
    command += VIEWING[viewing]
    health_port = None
    if scheme == "wss":
        health_port = free_port() if server != "baseline" else None
        command[command.index(f"ws://127.0.0.1:{port}")] = f"wss://127.0.0.1:{port}"
        command += ["--ca", str(write_certificate(workdir))]
    proc: subprocess.Popen[bytes] | None = None
    load: subprocess.Popen[str] | None = None
    sampler: bb.Sampler | None = None
    try:
        proc = start_server(
            server, port, workdir, health_port or (port if scheme == "wss" else None)
        )
        if server == "baseline" and scheme == "wss":
            wait_for_https(proc, port, log)
        else:  # the baseline has no /healthz: any answer (a 404) will do
            wait_ready(
                proc, health_port or port, timeout=bb.STARTUP_TIMEOUT, log=log,
                any_answer=server == "baseline",
            )  # fmt: skip
        time.sleep(1.0)  # let it settle
        rss_before, cpu_before = bb.tree_rss(proc.pid), bb.tree_cpu(proc.pid)
        sampler = bb.Sampler(
            proc.pid, health_port or port
        )  # peak RSS (its /healthz polls fail quietly here)
        sampler.start()
        trace = CpuTrace(proc.pid)
        trace.start()
        reaped_before, (busy_before, _) = bb.children_cpu(), bb.system_busy()
        started = time.monotonic()
        load = spawn(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        trace.halt.set()
        trace.join()
        time.sleep(1.0)  # the viewers' sockets are closed: let the server let go of them
        rss_after = bb.tree_rss(proc.pid)
        if load.returncode != 0:
            raise RuntimeError(f"fake_dll load exited with {load.returncode}: {err.strip()}")
        result = json.loads(out.strip().splitlines()[-1])
        window_cpu = trace.within(result["window"]) if "window" in result else None
        return {
            "server": server,
            "scheme": scheme,
            "viewing": viewing,
            "viewers": viewers,
            "stalled": stalled,
            "load": result,
            "load_stderr": err.strip().splitlines(),
            "rss_mb": {
                "before": round(rss_before / 2**20, 1),
                "peak": round(max(sampler.peak_rss, rss_before, rss_after) / 2**20, 1),
                "after": round(rss_after / 2**20, 1),
            },
            "cpu_s": round(cpu, 2),
            "window_cpu_s": None if window_cpu is None else round(window_cpu, 3),
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


def cpu_per_delivery_us(result: dict[str, Any]) -> float | None:
    delivered = result["load"]["updates_delivered"]
    return round(1e6 * result["cpu_s"] / delivered, 1) if delivered else None


def window_cpu_per_delivery_us(result: dict[str, Any]) -> float | None:
    """The server's CPU within the measured window, per update delivered in it."""
    delivered, cpu = result["load"]["updates_delivered"], result.get("window_cpu_s")
    return round(1e6 * cpu / delivered, 1) if delivered and cpu is not None else None


def table(results: Sequence[dict[str, Any]]) -> str:
    head = (
        "| viewers (stalled) | server | updates delivered | deliveries/s (expected) "
        "| latency p50 ms | p99 ms | max ms | freshness p50 ms | p99 ms "
        "| RSS MB before->after (peak) | CPU s (rest of machine) | CPU us/delivery "
        "| window: CPU s | us/delivery | wire B/delivery |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["viewers"], result["stalled"]), []).append(result)
    for (viewers, stalled), group in groups.items():
        label = f"{viewers} ({stalled})"
        for r in sorted(
            group,
            key=lambda r: (SERVERS.index(r["server"]), r.get("scheme", "ws"), r.get("viewing")),
        ):
            name = r["server"] + (" wss" if r.get("scheme") == "wss" else "")
            name += f" {r['viewing']}" if r.get("viewing", "all") != "all" else ""
            if "error" in r:
                rows.append(f"| {label} | {name} | failed: {r['error'][:120]} |")
                continue
            x, rss = r["load"], r["rss_mb"]
            lat, fresh = x["latency_ms"], x["freshness_ms"]
            rows.append(
                f"| {label} | {name} | {x['updates_delivered']} "
                f"| {x['deliveries_per_s']:g} ({x['expected_deliveries_per_s']:g}) "
                f"| {number(lat['p50'])} | {number(lat['p99'])} | {number(lat['max'])} "
                f"| {number(fresh['p50'])} | {number(fresh['p99'])} "
                f"| {rss['before']:g} -> {rss['after']:g} ({rss['peak']:g}) "
                f"| {r['cpu_s']:g} ({r['other_cpu_s']:g}) | {number(cpu_per_delivery_us(r))} "
                f"| {number(r.get('window_cpu_s'))} | {number(window_cpu_per_delivery_us(r))} "
                f"| {number(x.get('bytes_per_delivery', {}).get('wire'))} |"
            )
        for scheme in ("ws", "wss"):
            by_server = {
                r["server"]: r
                for r in group
                if r.get("scheme", "ws") == scheme and "error" not in r
            }
            by_server = {s: r for s, r in by_server.items() if r.get("viewing", "all") == "all"}
            base, hub = by_server.get("baseline"), by_server.get("mt5hub")
            if base and hub:
                b, h = base["load"], hub["load"]
                rows.append(
                    f"| {label} | **ratio {scheme}** "
                    f"| {ratio(h['updates_delivered'], b['updates_delivered'])} "
                    f"| {ratio(h['deliveries_per_s'], b['deliveries_per_s'])} "
                    + "".join(
                        f"| {ratio(b['latency_ms'][q], h['latency_ms'][q])} "
                        for q in ("p50", "p99", "max")
                    )
                    + "".join(
                        f"| {ratio(b['freshness_ms'][q], h['freshness_ms'][q])} "
                        for q in ("p50", "p99")
                    )
                    + f"| {ratio(base['rss_mb']['after'], hub['rss_mb']['after'])} | | | | | |"
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
    parser.add_argument(
        "--change", default="0.1", help="fraction of the cells a publish moves (fake_dll --change)"
    )
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and server logs")
    parser.add_argument(
        "--servers", default="baseline,mt5hub", help="baseline, before and/or mt5hub"
    )
    parser.add_argument(
        "--before", default="", help="a checkout (e.g. a git worktree of an older commit): "
        "the `before` server is its mt5hub, for interleaved before/after pairs",
    )  # fmt: skip
    parser.add_argument("--schemes", default="ws", help="ws and/or wss (TLS), comma-separated")
    parser.add_argument(
        "--viewing", default="all", help="what mt5hub's viewers ask for, comma-separated: all "
        "(every table whole), delta (patches, /ws?delta=1), one (one table each, /ws?keys=)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds of each pair")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    schemes = [s for s in args.schemes.split(",") if s]
    viewings = [v for v in args.viewing.split(",") if v]
    if not set(viewings) <= set(VIEWING):
        parser.error(f"--viewing takes {', '.join(VIEWING)}")
    if not set(servers) <= set(SERVERS) or not set(schemes) <= {"ws", "wss"}:
        parser.error(f"--servers takes {', '.join(SERVERS)}; --schemes takes ws, wss")
    if ("before" in servers) != bool(args.before):
        parser.error("--before PATH and the server `before` go together")
    BEFORE[:] = [args.before] if args.before else []
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
                    runs = [
                        (n, sv, sc, vw)
                        for n in range(args.repeat)
                        for sv in servers
                        for sc in schemes
                        for vw in (viewings if sv != "baseline" else ["all"])
                    ]
                    for n, server, scheme, viewing in runs:
                        workdir = root / f"{server}-{scheme}-{viewing}-{viewers}-{stalled}-{n}"
                        workdir.mkdir()
                        print(
                            f"== {server} over {scheme}: {args.publishers} x {args.rate:g}/s -> "
                            f"{viewers} viewers ({stalled} stalled), {args.seconds:g} s"
                            + (", deflate" if args.deflate else "")
                            + (f", viewing {viewing}" if viewing != "all" else ""),
                            file=sys.stderr,
                            flush=True,
                        )
                        try:
                            result = run_one(
                                server, scheme, viewers, stalled, args, workdir, viewing
                            )
                        except (RuntimeError, OSError, ValueError) as exc:
                            result = {
                                "server": server,
                                "scheme": scheme,
                                "viewing": viewing,
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
            f"{x['viewers_closed']} viewers closed"
            + (f", {us:g} us CPU/delivery" if (us := cpu_per_delivery_us(result)) else ""),
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
