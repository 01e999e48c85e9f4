"""One scenario run from start to end, the table and the summary, and the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import bench_backplane as bb
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
)

import attacks
from mt5hub.testing.launcher import healthz

from .common import (
    FULL,
    PRIMED_TABLES,
    QUICK,
    SCENARIOS,
    SETTLE_AFTER,
    WITNESS_RATE,
    percentiles,
    scenario_overrides,
)
from .context import Ctx
from .fault import attack_fault, finish_fault, prime_tables
from .flood import attack_flood
from .garbage import attack_garbage
from .hub import (
    HubProcess,
    Sampler,
    hub_sockets,
    live_connections,
    open_fds,
    scrape_metrics,
    snapshot_tables,
)
from .idle import attack_idle
from .never_reads import attack_never_reads
from .witness import WitnessProcess, witness, witness_figures


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_scenario(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    overrides = scenario_overrides(name, args.quick)
    hub = HubProcess(workdir, overrides)
    witness_proc: WitnessProcess | None = None
    sampler: Sampler | None = None
    began = time.monotonic()
    try:
        hub.start()
        primed: dict[tuple[str, str], str] = {}
        if name in ("restart", "kill"):
            primed = trio.run(prime_tables, hub.port, PRIMED_TABLES, args.seed)
        witness_proc = WitnessProcess(hub.port, workdir, args.seed)
        witness_proc.wait_ready()
        ready = time.time()
        time.sleep(plan.baseline)
        baseline = healthz(hub.port)
        tables = set(trio.run(snapshot_tables, hub.port).keys())
        metrics_before = scrape_metrics(hub.port)
        fds_before, sockets_before = open_fds(hub.worker()), hub_sockets(hub.port)
        live_before = live_connections(hub.port)
        sampler = Sampler(hub)
        sampler.start()
        ctx = Ctx(name, plan, hub, sampler, args.seed, baseline, metrics_before, tables, primed)
        busy_before, cpu_before, witness_cpu_before = bb.system_busy()[0], self_cpu(), 0.0
        witness_cpu_before = witness_proc.cpu()
        attack_start = time.time()
        if name == "flood":
            attack = attack_flood(ctx)
        elif name == "idle-5000":
            attack = attack_idle(ctx)
        elif name == "never-reads":
            attack = attack_never_reads(ctx)
        elif name in ("restart", "kill"):
            attack = attack_fault(ctx, kill=name == "kill")
        else:
            attack = attack_garbage(ctx)
        time.sleep(SETTLE_AFTER)
        rss = sampler.finish()
        deadline = time.monotonic() + 3.0  # the hub's ends of closed connections: let them go
        while live_connections(hub.port) > live_before and time.monotonic() < deadline:
            time.sleep(0.1)
        fds_after, sockets_after = open_fds(hub.worker()), hub_sockets(hub.port)
        leaked = live_connections(hub.port) - live_before
        if leaked > 0:
            attack.outcome += f"; the hub still holds {leaked} of the attack's connections"
            if name != "flood":  # the flood's check names it already
                attack.checks_failed.append(
                    f"the hub still holds {leaked} connection(s) the attacker has closed"
                )
        witness_cpu = witness_proc.cpu() - witness_cpu_before
        attacker_cpu = self_cpu() - cpu_before
        busy = bb.system_busy()[0] - busy_before
        w = witness_proc.stop()
        rss_end = bb.rss_bytes(hub.worker() or 0)  # once more, a few seconds later
        if name in ("restart", "kill"):
            finish_fault(attack, w, kill=name == "kill")
        witness = witness_figures(w, attack_start, attack.window_end)
        witness["baseline"] = percentiles(
            [r[3] - r[2] for r in w["received"] if ready <= r[2] < attack_start]
        )
        if witness["lost"]:
            attack.checks_failed.append(f"the witness viewer lost {witness['lost']} (latest state)")
        if witness["corrupt"]:
            attack.checks_failed.append("the witness viewer holds data that was never published")
        return {
            "scenario": name,
            "settings_changed": overrides,
            "outcome": attack.outcome,
            "attacker": attack.figures,
            "witness": witness,
            "restored_seq_behind": attack.restored_behind,
            "hub_rss_mb": {
                **{k: rss[k] for k in ("before", "peak", "after")},
                "at_the_end": round(rss_end / 2**20, 1),
            },
            "hub_fds": {"before": fds_before, "peak": rss["peak_fds"], "after": fds_after},
            "hub_connections_left": max(0, leaked),
            "hub_sockets": {"before": sockets_before, "after": sockets_after},
            "recover_s": attack.recover_s,
            "recover": attack.recover_what,
            "cpu_s": {
                "hub": rss["cpu_s"],
                "attacker": round(attacker_cpu, 2),
                "witness": round(witness_cpu, 2),
                "rest_of_machine": round(busy - rss["cpu_s"] - attacker_cpu - witness_cpu, 2),
            },
            "checks_failed": attack.checks_failed,
            "took_s": round(time.monotonic() - began, 1),
        }
    finally:
        if sampler is not None:
            sampler.halt.set()
        if witness_proc is not None:
            witness_proc.kill()
        hub.stop()


# -- the report -----------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def row(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [r["scenario"], f"failed: {r['error']}", "-", "-", "-"]
    w, rss = r["witness"], r["hub_rss_mb"]
    witness = f"{w['lost']} lost / p99 {fmt_ms(w['p99_ms'])}"
    if r["restored_seq_behind"] is not None:
        witness += f"; restored {r['restored_seq_behind']} behind"
    outcome = r["outcome"]
    if r["checks_failed"]:
        outcome += " **UNEXPECTED: " + "; ".join(r["checks_failed"]) + "**"
    recover = "not within its bound" if r["recover_s"] is None else f"{r['recover_s']:g} s"
    if r["hub_connections_left"]:
        recover += f", but {r['hub_connections_left']} connection(s) never released"
    return [
        r["scenario"],
        outcome.replace("|", "/"),
        witness,
        f"{rss['before']:g} → {rss['peak']:g} → {rss['after']:g} MB",
        recover,
    ]


def table(results: Sequence[dict[str, Any]]) -> str:
    head = [
        "attack",
        "outcome for the attacker",
        "witness: latest state lost / p99 latency",
        "hub RSS before → peak → after",
        "time to recover",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


BULKY = ("by_kind", "times", "state_file", "snapshot_witness", "hub_log")


def summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures behind the table, one entry per scenario, without the bulkier details."""
    out: dict[str, Any] = {}
    for r in results:
        if "error" in r:
            out[r["scenario"]] = {"error": r["error"]}
            continue
        w = r["witness"]
        out[r["scenario"]] = {
            "settings_changed": r["settings_changed"],
            "attacker": {k: v for k, v in r["attacker"].items() if k not in BULKY},
            "witness": {
                k: w[k]
                for k in (
                    "lost",
                    "updates",
                    "p50_ms",
                    "p99_ms",
                    "max_ms",
                    "seq_gaps",
                    "closed",
                    "baseline",
                )
            },
            "restored_seq_behind": r["restored_seq_behind"],
            "hub_rss_mb": r["hub_rss_mb"],
            "hub_fds": r["hub_fds"],
            "hub_sockets_after": r["hub_sockets"]["after"],
            "hub_connections_left": r["hub_connections_left"],
            "cpu_s": r["cpu_s"],
            "recover_s": r["recover_s"],
            "checks_failed": r["checks_failed"],
            "took_s": r["took_s"],
        }
    return out


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind the same way, so that the finally blocks stop every child.

    SIGTERM goes through the SIGINT handler: inside trio.run that is trio's, which raises
    KeyboardInterrupt only where it is safe (bench_backplane's sigterm_as_exit raises SystemExit
    from the handler, which can land inside trio's scheduler and abandon the run). SIGINT is
    set to Python's own handler first: a background job inherits it ignored.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        interrupt = signal.getsignal(signal.SIGINT)
        if not callable(interrupt):
            raise KeyboardInterrupt
        interrupt(signal.SIGINT, frame)  # trio's may defer it to a safe point, and return

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(attacks.__doc__ or "").split("\n\n")[0],
        epilog="Scenarios and the table's columns: scripts/attacks/__init__.py.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all, in this order)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter bounds: ~1.5 min, not 2")
    parser.add_argument("--seed", type=int, default=20261126, help="for the junk and the tables")
    parser.add_argument("--json", action="store_true", help="also print everything measured")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs and their logs")
    parser.add_argument("--witness-port", type=int, help=argparse.SUPPRESS)  # the witness process
    args = parser.parse_args(argv)
    if args.witness_port:
        result = trio.run(witness, args.witness_port, WITNESS_RATE, args.seed)
        print(json.dumps(result), flush=True)
        return 0
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    names = [n for n in SCENARIOS if n in args.scenarios] or list(SCENARIOS)
    root = Path(tempfile.mkdtemp(prefix="mt5hub-attack-"))
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        with interruptible():
            for name in names:
                workdir = root / name
                workdir.mkdir()
                print(f"== {name}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
                try:
                    result = run_scenario(name, args, workdir)
                except (
                    RuntimeError,
                    OSError,
                    ValueError,
                    KeyError,
                    trio.TooSlowError,
                    HandshakeError,
                    ConnectionClosed,
                ) as exc:
                    traceback.print_exc()
                    result = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
                result["hub_log"] = {"path": str(workdir / "hub.log")}
                result["hub_log"].update(bb.grep_log(workdir / "hub.log"))
                results.append(result)
                print("   " + " | ".join(row(result)), file=sys.stderr, flush=True)
                bb.report_logs(result, "hub_log", "hub log")
    except* KeyboardInterrupt:  # bare, or from inside a trio nursery
        print("interrupted", file=sys.stderr)
    took = time.monotonic() - started
    print(f"took {took:.0f} s", file=sys.stderr)

    def render(done: Sequence[dict[str, Any]]) -> str:
        brief = {
            "took_s": round(took, 1),
            "quick": args.quick,
            "seed": args.seed,
            "cpus": os.cpu_count(),
            "scenarios": summary(done),
        }
        return table(done) + "\n\n" + json.dumps(brief, indent=2)

    status = bb.finish(results, args, root, render)
    failed = [r["scenario"] for r in results if r.get("checks_failed")]
    if failed:
        print(f"expectations not met in: {', '.join(failed)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
