#!/usr/bin/env python3
"""Many trionets on one host: N processes (default 100), one per fake VM,
each on the user backend with 4 queue pairs set up, enabled and stocked.

Reports:
  start     spawn of the first process to the last one's --ready-fd line
            (all N started at once), and the time to connect every fake VM
  memory    total RSS (shared pages counted once per process) and total PSS
            (shared pages divided among the processes), and per instance
  idle CPU  CPU seconds the whole fleet used over --idle seconds (default 10)
            with every VM connected and silent; ~0 when nothing polls
  stop      SIGTERM to all; how many exited 0 within the grace

Run it alone (it starts N Python processes): ``flock /tmp/trionet-heavy.lock
.venv/bin/python tools/benchfleet.py``.  ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fakes.fleet import Fleet, idle_cpu, memory_kib  # noqa: E402


async def run(n: int, pairs: int, idle: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="trionet-fleet-") as d:
        fleet = Fleet(Path(d), pairs=pairs)
        try:
            fleet.spawn(n)
            await fleet.wait_ready()
            await fleet.connect_vms()
            await trio.sleep(1.0)  # let start-up work (router advertisements) settle
            dead = [i for i in range(n) if i not in fleet.alive()]
            if dead:
                raise SystemExit(f"instances died: {dead}")
            mem = [memory_kib(p) for p in fleet.pids()]
            cpu = await idle_cpu(fleet.pids(), idle)
        finally:
            t0 = time.monotonic()
            codes = fleet.stop()
            stop_s = time.monotonic() - t0
    rss = sum(m[0] for m in mem)
    pss = sum(m[1] for m in mem)
    return {
        "instances": n,
        "pairs_each": pairs,
        "start_to_all_ready_s": round(fleet.ready_s, 2),
        "connect_all_vms_s": round(fleet.connected_s, 2),
        "rss_total_mib": round(rss / 1024, 1),
        "rss_per_instance_mib": round(rss / 1024 / n, 1),
        "pss_total_mib": round(pss / 1024, 1),
        "pss_per_instance_mib": round(pss / 1024 / n, 1),
        "idle_window_s": idle,
        "idle_cpu_s": round(cpu, 3),
        "idle_cpu_percent_of_one_core": round(100 * cpu / idle, 2),
        "stop_all_s": round(stop_s, 2),
        "exited_0": sum(1 for c in codes if c == 0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--idle", type=float, default=10.0, help="idle window in seconds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    figures = trio.run(run, args.instances, args.pairs, args.idle)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
