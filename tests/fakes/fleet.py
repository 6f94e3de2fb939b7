"""Many trionet processes on one host, one per fake VM.

Each instance is ``python -m trionet --backend user --queue-pairs N`` on its
own socket, started with ``--ready-fd`` (its readiness line is what "started"
means).  Its VM is a scripted front-end in this process: guest RAM in a memfd,
every pair's rings set up and enabled, the RX rings stocked with buffers, as
a booted guest with nothing to say leaves them.  Then the fleet sits idle and
is measured: resident memory and CPU time, from /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import Frontend

CLK_TCK = os.sysconf("SC_CLK_TCK")
RX_BUFFERS = 32
READY_TIMEOUT = 300.0


@dataclass
class Instance:
    index: int
    socket_path: Path
    popen: subprocess.Popen[bytes]
    ready_r: int
    ram: GuestRam | None = None
    fe: Frontend | None = None
    ready_line: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Fleet:
    directory: Path
    instances: list[Instance] = field(default_factory=list)
    pairs: int = 4
    spawned_at: float = 0.0
    ready_s: float = 0.0
    connected_s: float = 0.0

    def spawn(self, n: int, *extra: str) -> None:
        self.spawned_at = time.monotonic()
        for i in range(n):
            r, w = os.pipe()
            sock = self.directory / f"vm{i}.sock"
            cmd = [
                sys.executable, "-m", "trionet", "--backend", "user",
                "--queue-pairs", str(self.pairs), "--socket-path", str(sock),
                "--ready-fd", str(w), "--vm-id", f"vm{i}", "--log-level", "warning", *extra,
            ]  # fmt: skip
            log = (self.directory / f"vm{i}.log").open("wb")
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,))
            log.close()
            os.close(w)
            os.set_blocking(r, False)
            self.instances.append(Instance(i, sock, popen, r))

    async def wait_ready(self) -> None:
        async def one(inst: Instance) -> None:
            while not inst.ready_line.endswith(b"\n"):
                try:
                    chunk = os.read(inst.ready_r, 256)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(inst.ready_r)
                    continue
                if not chunk:
                    log = (self.directory / f"vm{inst.index}.log").read_text(errors="replace")
                    raise AssertionError(f"vm{inst.index} closed --ready-fd unready: {log}")
                inst.ready_line += chunk

        with trio.fail_after(READY_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for inst in self.instances:
                    nursery.start_soon(one, inst)
        self.ready_s = time.monotonic() - self.spawned_at

    async def connect_vms(self) -> None:
        """Every instance gets its VM: pairs set up, enabled, RX stocked."""
        start = time.monotonic()
        for inst in self.instances:
            inst.ram = GuestRam(2 << 20)
            fe = await Frontend.connect(str(inst.socket_path), inst.ram)
            inst.fe = fe
            await fe.negotiate()
            await fe.setup_pairs(self.pairs)
            for p in range(self.pairs):
                for _ in range(RX_BUFFERS):
                    fe.queues[2 * p].add_rx(2048)
                fe.kick(2 * p)
            await fe.sync()
        self.connected_s = time.monotonic() - start

    def pids(self) -> list[int]:
        return [inst.pid for inst in self.instances]

    def alive(self) -> list[int]:
        return [inst.index for inst in self.instances if inst.popen.poll() is None]

    def stop(self, timeout: float = 60.0) -> list[int | None]:
        """SIGTERM everyone; exit statuses (None: killed after ``timeout``)."""
        for inst in self.instances:
            if inst.popen.poll() is None:
                inst.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for inst in self.instances:
            try:
                codes.append(inst.popen.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                inst.popen.kill()
                inst.popen.wait()
                codes.append(None)
        for inst in self.instances:
            if inst.fe is not None:
                inst.fe.close()
            if inst.ram is not None:
                inst.ram.close()
            with suppress(OSError):
                os.close(inst.ready_r)
        return codes


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB: RSS counts shared pages (libpython, the
    C core) in full for every process, PSS divides them among their users."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


async def idle_cpu(pids: list[int], seconds: float) -> float:
    """CPU seconds all ``pids`` used together over ``seconds`` of wall time."""
    before = sum(cpu_seconds(p) for p in pids)
    await trio.sleep(seconds)
    return sum(cpu_seconds(p) for p in pids) - before
