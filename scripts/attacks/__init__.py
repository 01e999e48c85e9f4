#!/usr/bin/env python3
"""Attacks and faults against a real hub, measured: the figures for the hardening report.

    .venv/bin/python scripts/attack_report.py            # every scenario, about 2 minutes
    .venv/bin/python scripts/attack_report.py --quick    # shorter bounds, about 1.5 minutes
    .venv/bin/python scripts/attack_report.py flood garbage --json --keep

For each scenario it writes a hub.toml into a temporary folder (the repo's hub.toml with a plain WS
bind on a free loopback port, `backlog = 1024`, its own token, and the scenario's changes below),
starts `hypercorn --config hub.toml mt5hub:app` there, and starts the **witness**: a process of its
own (so that the attacker's event loop cannot delay it) holding a publisher that sends a 28-pair x
9-timeframe table (fake_dll's SignalTable, ~11.5 KB) 10 times a second and a viewer that records
every update. Then it runs the attack, waits for the hub to recover, stops the witness (which first
waits until its viewer holds its last publish) and the hub (SIGTERM, then SIGKILL of its process
group), also on Ctrl-C or an error. Clients talk to loopback addresses only, every step is
bounded in time, and tests/ prove the behaviour; this measures it on this machine.

Scenarios (changes to hub.toml in brackets):
    flood        one publisher on a raw socket sending small valid publishes as fast as it can,
                 aimed at 10,000/s: rate_limited error frames, then close 1008 after
                 flood_seconds; then it answers the close and hangs up  [--quick: flood_seconds = 2]
    idle-5000    5,000 raw sockets from 127.0.0.2-127.0.0.6 (bound before connect) doing the
                 WebSocket upgrade of /ws at once, then never reading; answers awaited up to 60 s
                 (--quick: 10 s), held 10 s (2 s), then closed
                 [max_viewers = 3000, max_viewers_per_ip = 1000]
    never-reads  50 viewers (from 127.0.0.7) that finish the handshake and never read while the
                 witness publishes: conflated, then cut with 4009 after slow_viewer_timeout
                 [--quick: slow_viewer_timeout = 5]
    restart      SIGTERM to Hypercorn's master (as systemd's KillMode=mixed does) under the witness
                 load, then the hub again in the same folder, so that its state file persists; 27
                 more tables are published once beforehand, so the snapshot must hold 28
    kill         the same with SIGKILL to the hub's process group (a crash: the state file is up
                 to state_interval old)
    garbage      200 connections (100 with --quick) from 127.0.0.8-127.0.0.11, each one kind of junk
                 from a seeded generator (--seed): random bytes instead of HTTP, broken handshakes,
                 a frame before the 101, invalid UTF-8, protocol violations, a frame over 1 MiB,
                 bad JSON, random frames

The table's columns:
    attack                      the scenario
    outcome for the attacker    what the attacking clients saw: HTTP statuses, close codes, error
                                frames, and the figures of the attack (rates, times, counts)
    witness: lost / p99         updates of the latest state the witness viewer did not end with:
                                0 when, after the run, it holds exactly the data of the witness
                                publisher's last publish (else how many publishes it is behind);
                                then the witness's delivery latency p99 (publisher's send time to
                                the viewer's receive time, same host clock) from the attack's start
                                to the hub's recovery. restart/kill add `restored N behind`: how
                                many seq the state the new hub restored is behind the last update
                                the witness viewer got from the old hub (0: nothing lost)
    hub RSS before → peak → after
                                VmRSS of Hypercorn's worker process (/proc/<pid>/status,
                                sampled every 100 ms): just before the attack, its peak during
                                the attack and the recovery, and 1 s after the recovery
    time to recover             flood: from the 1008 until /healthz shows the publishers of before;
                                idle-5000: from closing the 5,000 sockets until /healthz shows the
                                viewers of before; never-reads: from the 50 connected until the hub
                                had dropped them all; restart/kill: from the signal until a new
                                viewer's snapshot holds every table; garbage: from the last junk
                                connection's end until /healthz shows the connections of before.
                                `but N connection(s) never released`: after the recovery the hub
                                still holds N more connections (its ends of TCP connections on its
                                port, ESTABLISHED or CLOSE_WAIT in /proc/net/tcp) than before the
                                attack, although the attacker has closed them all

A row's outcome ends in **UNEXPECTED: ...** when an expectation of the hardening issue did not hold
(the witness lost its latest state, no 1008, connections not released, tables missing after a
restart, a 1011 or a traceback, ...). The JSON summary after the table holds the same figures and
more: CPU seconds of the hub, the attacker and the witness during each scenario, and what the rest
of the machine used meanwhile (a disturbed run shows there); the hub's open files before, at their
peak and after; the kernel's listen-queue counters. `--json` also prints everything measured,
including the hub log's warning lines; `--keep` keeps each scenario's folder (hub.log,
witness.log, hub.toml). The exit status is 1 if a scenario failed to run or was UNEXPECTED.
"""

from mt5hub.testing.tw_workaround import pong_unless_closing

# Its viewers leave while the hub pings them (the witness, snapshot_tables): without this their
# close crashes trio-websocket's reader task (python-trio/trio-websocket#184).
pong_unless_closing()
