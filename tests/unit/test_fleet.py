"""Many instances on one host: idle trionets use no CPU (nothing polls).

Ten ``--backend user`` processes with 4 pairs each, every one serving a fake
VM whose rings are set up, enabled and stocked; over the idle window the
whole fleet may use only scheduler noise.  ``tools/benchfleet.py`` runs the
same fleet at 100 instances and reports memory and start time too.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes.fleet import Fleet, idle_cpu, memory_kib

INSTANCES = 10
IDLE_WINDOW = 3.0
# CPU time is counted in clock ticks (10 ms).  The bound is 0.05 CPU seconds
# for the fleet over the window; ten processes each waking every 10 ms (about
# 100 us of Python per wake-up) would use 0.3.
IDLE_CPU_BOUND = 0.05


async def test_idle_fleet_uses_no_cpu(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, pairs=4)
    try:
        fleet.spawn(INSTANCES)
        await fleet.wait_ready()
        await fleet.connect_vms()
        for inst in fleet.instances:
            assert inst.ready_line.startswith(b"READY=1")
        assert fleet.alive() == list(range(INSTANCES))
        cpu = await idle_cpu(fleet.pids(), IDLE_WINDOW)
        assert cpu <= IDLE_CPU_BOUND, f"idle fleet used {cpu:.3f} CPU s in {IDLE_WINDOW} s"
        assert all(rss > 0 for rss, _ in map(memory_kib, fleet.pids()))
    finally:
        codes = fleet.stop()
    assert codes == [0] * INSTANCES
