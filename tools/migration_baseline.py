"""Live migrations of the e2e tests' guest with no trionet at all: QEMU's own
virtio-net on ``-netdev user`` (slirp), the same kernel command line, 2 vCPUs
and workload as tests/e2e/test_guest_migration.py (ping to the gateway every
0.2 s, 100 numbered UDP datagrams a second into socat through a host forward).

What it is for: telling a guest that crashes or hangs after a migration
because of the emulator from one that trionet broke. Each run migrates once,
then asks the destination guest for ``true`` on its serial console and looks
for a kernel crash in its console output.

    .venv/bin/python tools/migration_baseline.py [RUNS] [--keep DIR]

Prints one line per run (``ok``, ``crashed: <first crash line>``, ``silent``:
no answer on the console, or ``error: ...``) and the totals. Traffic reaches
only 127.0.0.1 (the forward and slirp's gateway); every QEMU is stopped by pid.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.guest import GuestError, ensure_guest_image  # noqa: E402
from tests.e2e.ports import free_ports  # noqa: E402
from tests.e2e.qmp import QMP  # noqa: E402
from tests.e2e.test_guest_migration import (  # noqa: E402
    GUEST_PORT,
    KERNEL_CRASH,
    RATE,
    datagram,
    migrate,
    qemu,
    vm_argv,
)

STREAM_BEFORE = 3.0
STREAM_AFTER = 5.0


def argv(qmp: Path, port: int, extra: list[str]) -> list[str]:
    forward = f"hostfwd=udp:127.0.0.1:{port}-:{GUEST_PORT}"
    return vm_argv(None, qmp, extra, netdev=["-netdev", f"user,id=net0,{forward}"])


async def one_run(work: Path) -> str:
    port_a, port_b = free_ports(2, socket.SOCK_DGRAM)
    mig = work / "migration.sock"
    dest = [("127.0.0.1", port_a)]
    async with (
        qemu(argv(work / "a.qmp", port_a, []), work / "console-a.log") as src,
        qemu(
            argv(work / "b.qmp", port_b, ["-incoming", f"unix:{mig}"]), work / "console-b.log"
        ) as dst,
    ):
        await src.wait_for("TRIONET-GUEST-READY", 180)
        await src.check("true", timeout=30)
        await src.check("ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up")
        await src.check(
            f"socat -u UDP4-RECV:{GUEST_PORT} OPEN:/tmp/rx,creat,append >/tmp/socat.log 2>&1 &"
        )
        await src.check("ping -i 0.2 10.0.2.2 >/tmp/ping.out 2>&1 &")
        sock = trio.socket.socket(type=socket.SOCK_DGRAM)

        async def stream() -> None:
            n = 0
            start = trio.current_time()
            while True:
                await sock.sendto(datagram(n), dest[0])
                n += 1
                await trio.sleep_until(start + n / RATE)

        with sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream)
                await trio.sleep(STREAM_BEFORE)
                src_qmp = await QMP.connect(work / "a.qmp")
                dst_qmp = await QMP.connect(work / "b.qmp")
                info = await migrate(src_qmp, f"unix:{mig}")
                dest[0] = ("127.0.0.1", port_b)
                if info.get("status") != "completed":
                    return f"error: migration {info.get('status')}"
                await trio.sleep(STREAM_AFTER)
                nursery.cancel_scope.cancel()
        try:
            await dst.check("true", timeout=20)
            answered = True
        except (GuestError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            answered = False  # silent, or its QEMU is gone (a panic ends it)
        src_qmp.close()
        dst_qmp.close()
        m = KERNEL_CRASH.search(dst.console)
        if m:
            line = next(ln for ln in dst.console.splitlines() if m.group(0) in ln)
            return f"crashed: {line.strip()[:100]}"
        return "ok" if answered else "silent"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="?", type=int, default=10)
    ap.add_argument("--keep", type=Path, help="keep each run's consoles under this directory")
    args = ap.parse_args()
    ensure_guest_image()
    results: list[str] = []
    with tempfile.TemporaryDirectory(prefix="migbase-") as tmp:
        base = args.keep or Path(tmp)
        for i in range(1, args.runs + 1):
            work = base / f"run{i}"
            work.mkdir(parents=True, exist_ok=True)
            try:
                result = await one_run(work)
            except Exception as exc:  # (also inside a group)
                result = "error: " + " ".join(repr(exc).split())[:120]
            results.append(result)
            print(f"run {i}: {result}", flush=True)
    bad = [r for r in results if r != "ok"]
    print(f"{len(results)} migrations, {len(bad)} with the destination guest not ok")
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
