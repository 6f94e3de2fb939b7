"""TCP throughput through a vhost-user backend, with network namespaces instead of a VM.

Topology of one run (two fresh namespaces named after the pid and a sequence
number, deleted afterwards):

    namespace G ("guest")                        namespace H ("host")
    iperf3 client, 10.77.0.1/24 on tng0          iperf3 server, 10.77.0.2/24 on tnb0
       |  kernel TCP/IP                                   |  kernel TCP/IP
    tng0: veth, its peer tng0b in G too          tnb0: kernel tap of the backend
       |                                                  |
    frontend testpmd, CPU 1, io retry mode:      backend under test, CPU 0:
      port 0 net_af_packet0,iface=tng0b <->        trionet --backend tap --tap tnb0
      port 1 net_virtio_user0,path=SOCK ==SOCK==     --queue-pairs 1 [--threads], or
                                                   testpmd, io mode: port 0
                                                     net_vhost0,iface=SOCK <-> port 1
                                                     net_tap1,iface=tnb0

The frontend testpmd plays the guest's virtio-net driver: every frame the guest
kernel sends on tng0 goes into the virtio TX ring, every frame the backend puts in
the virtio RX ring goes out through tng0 (--forward-mode=io with tx retry, ports
paired, no --tx-first; benchlib.bridge_frontend_argv).  Both testpmd instances run
without hugepages, as in tools/bench; each runs inside its namespace (the frontend's
net_af_packet polls tng0's veth peer there, the backend testpmd's net_tap creates
tnb0 there), and meets the other side through the vhost-user socket on the shared
file system.

Definitions:

  out   the iperf3 client in G sends to the server in H: guest TX -> backend -> host.
  in    iperf3 --reverse: the server in H sends to the client in G: host -> backend
        -> guest RX.
  sender_gbps / receiver_gbps
        iperf3's own end-of-test totals (``end.sum_sent`` / ``end.sum_received`` of
        ``iperf3 -J``), in 10^9 bits of TCP payload per second, with the first
        second omitted as warm-up (``-O 1``).  The receiver figure is the goodput.
  retransmits
        TCP retransmissions counted by the sending side.
  fe_dropped
        frames the frontend testpmd received on one port and could not put on the
        other: with tx retry it waits up to 50 ms for room, as a kernel driver stops
        its queue, and drops only then.  In the "out" direction these are frames
        the backend did not take from the virtio TX ring in that time.
  be_dropped
        frames the backend dropped: trionet's own drop counters (status of its
        --control-socket); for DPDK, the net_vhost testpmd's io-mode TX drops (in
        the "in" direction: guest RX ring full).
  tap_dropped
        RX + TX drops the kernel counted on tng0 and tnb0 (e.g. a tap's queue
        overflowing because its reader fell behind; trionet waits for guest RX
        room before reading its tap, so its "in" losses show up here).
  backend_cpu
        CPU time of the backend's process (all threads, user + system) divided by
        wall time, over the measured part of the run.  It includes the host
        kernel's receive path, which runs inside the backend's writes to tnb0.
  ratio trionet / dpdk receiver_gbps of the same direction (on trionet rows).
  busy_before
        fraction of all CPUs busy during the half second before the run: anything
        well above 0 means other work on the machine and distorted figures.

Offloads and frame sizes, the same for both backends: tng0 and its peer have every
offload off and DPDK's net_tap opens its taps without IFF_VNET_HDR, so the kernel
in either namespace checksums and segments everything itself before a frame
reaches a port; the testpmd ports enable
no offloads, so virtio-user acks only MRG_RXBUF, RING_INDIRECT_DESC and VERSION_1
(no CSUM, GUEST_CSUM, TSO or UFO bits, and no EVENT_IDX) with either backend, and
trionet leaves TUNSETOFFLOAD at 0 on its tap.  Every frame is therefore at most
1514 bytes with a full checksum; no GSO frame crosses the virtio rings in either
case, so this compares per-frame costs at MTU 1500, not segment-count arithmetic.
(net_tap in DPDK 22.11 caps frames at 1522 bytes, so a jumbo MTU is not an option.)
Neither side does GRO: a write to a tap (or af_packet's send on a veth) runs the
receiving kernel's IP/TCP input and the wakeup of iperf3 in the writing thread, so
on the H side that work is charged to the backend's CPU in both cases, and on the
G side to the frontend's.

CPU placement (2 CPUs): the backend under test on CPU 0 (trionet's process and its
native worker thread; or the net_vhost testpmd's main and polling lcores), the
frontend testpmd on CPU 1.  iperf3 is left to the scheduler by default
(``pin_iperf=False``).  Pinning the server to CPU 0 and the client to CPU 1 was
tried and gave lower, no steadier figures: the DPDK backend polls, so a server
pinned beside it gets about half of CPU 0 and the host's TCP stack falls behind in
bursts of a scheduler time slice, while trionet spins briefly and then sleeps on
its kick eventfd, leaving CPU 0 to the server; unpinned, each iperf3 goes where
there is room.  Either way, a backend that needs less CPU leaves more to the TCP stacks
sharing the machine, and that is part of what is compared.

Ring size: the virtio-user rings have ``queue_size`` = 1024 entries by default
(the largest ring QEMU's virtio-net offers; virtio-user's default is 256), and
testpmd is told to use all of them (``--rxd``/``--txd``: without them ethdev's
fallback ring size gives each virtio queue 512 descriptors, half the ring, which a
guest's driver never leaves unused).  At
~100 k frames/s a 256-entry ring holds 2.5 ms of traffic, less than one scheduler
time slice of the core its consumer shares with iperf3, so io-mode drops dominated
TCP's behaviour (10 % of frames lost, large run-to-run spread).  The size is the same for
both backends.

Before iperf3 runs, three ICMP echo requests go from G to H (raw socket, no ping
binary needed) so that a broken topology fails with a clear message.  Every step
has a timeout; every process is started in its own session and stopped by pid;
namespaces, sockets and DPDK runtime directories are removed afterwards.  No
traffic leaves the two namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl
import benchprobes as bp

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("trionet", "dpdk")
DIRECTIONS = ("out", "in")

GUEST_IF = "tng0"
HOST_IF = "tnb0"
GUEST_ADDR = "10.77.0.1"
HOST_ADDR = "10.77.0.2"
PREFIX_LEN = 24
IPERF_PORT = 5201
OMIT_S = 1
DEFAULT_QUEUE_SIZE = bl.VIRTIO_QUEUE_SIZE


@dataclass
class TcpRow:
    """One backend in one direction; figures are None when the run failed."""

    backend: str  # "trionet" or "dpdk"
    direction: str  # "out" (guest -> host) or "in" (host -> guest)
    streams: int
    seconds: float
    sender_gbps: float | None = None
    receiver_gbps: float | None = None
    retransmits: int | None = None
    fe_dropped: int | None = None
    be_dropped: int | None = None
    tap_dropped: int | None = None
    backend_cpu: float | None = None  # CPUs' worth of time used by the backend process
    ratio: float | None = None  # trionet / dpdk receiver_gbps, on trionet rows
    busy_before: float | None = None  # all CPUs' busy fraction just before the run
    error: str | None = None


# --------------------------------------------------------------------------- one run


class _Run:
    """One backend, one direction: namespaces, processes, measurement, cleanup."""

    def __init__(
        self,
        *,
        workdir: Path,
        seq: int,
        backend: str,
        direction: str,
        python: str,
        seconds: float,
        streams: int,
        trionet_args: Sequence[str],
        pin_iperf: bool,
        queue_size: int,
    ) -> None:
        tag = f"tntcp{os.getpid()}r{seq}"
        self.ns_guest = tag + "g"
        self.ns_host = tag + "h"
        self.fe_prefix = tag + "f"
        self.be_prefix = tag + "b"
        self.sock = workdir / f"{tag}.sock"
        self.control = workdir / f"{tag}.ctl"
        self.logbase = workdir / f"tcp-{backend}-{direction}-{seq}"
        self.backend = backend
        self.direction = direction
        self.python = python
        self.seconds = seconds
        self.streams = streams
        self.trionet_args = list(trionet_args)
        self.pin_iperf = pin_iperf
        self.queue_size = queue_size
        self.procs: list[bl.Proc] = []
        self.namespaces: list[str] = []

    def _log(self, what: str) -> Path:
        return self.logbase.with_suffix(f".{what}.log")

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> bl.Proc:
        proc = bl.spawn(name, argv, self._log(name.split()[0]), env=env)
        self.procs.append(proc)
        return proc

    def _iperf_pin(self, cpu: int) -> list[str]:
        return bl.cpu_pin_prefix(cpu) if self.pin_iperf else []

    # ---------------------------------------------------------------- backends

    def start_trionet(self) -> bl.Proc:
        argv = [
            *bl.netns_exec(self.ns_host),
            *bl.cpu_pin_prefix(bl.BACKEND_CPU),
            self.python,
            "-m",
            "trionet",
            "--socket-path",
            str(self.sock),
            "--backend",
            "tap",
            "--tap",
            HOST_IF,
            "--queue-pairs",
            "1",
            "--control-socket",
            str(self.control),
            *self.trionet_args,
        ]
        return self._spawn("trionet", argv, env=bl.trionet_env(REPO))

    def start_dpdk_backend(self) -> bl.Proc:
        argv = bl.testpmd_argv(
            cpu=bl.BACKEND_CPU,
            prefix=self.be_prefix,
            vdev=f"net_vhost0,iface={self.sock},queues=1",
            app_args=bl.IO_BRIDGE_ARGS,
        )
        argv = bl.with_extra_vdevs(argv, [f"net_tap1,iface={HOST_IF}"])
        return self._spawn("backend testpmd", [*bl.netns_exec(self.ns_host), *argv])

    def start_frontend(self) -> bl.Proc:
        link = bl.make_guest_link(self.ns_guest, GUEST_IF)
        argv = bl.bridge_frontend_argv(
            prefix=self.fe_prefix, link=link, sock=self.sock, queue_size=self.queue_size
        )
        return self._spawn("frontend testpmd", [*bl.netns_exec(self.ns_guest), *argv])

    # ---------------------------------------------------------------- run

    def run(self) -> TcpRow:
        row = TcpRow(self.backend, self.direction, self.streams, self.seconds)
        frontend: bl.Proc | None = None
        try:
            for ns in (self.ns_guest, self.ns_host):
                bl.run_cmd(["ip", "netns", "add", ns], "create namespace")
                self.namespaces.append(ns)

            if self.backend == "trionet":
                backend = self.start_trionet()
            else:
                backend = self.start_dpdk_backend()
            bl.wait_for_socket(self.sock, backend, timeout=30.0)
            bl.wait_for_link(self.ns_host, HOST_IF, backend, timeout=15.0)
            bl.configure_link(self.ns_host, HOST_IF, f"{HOST_ADDR}/{PREFIX_LEN}")

            frontend = self.start_frontend()
            bl.configure_link(self.ns_guest, GUEST_IF, f"{GUEST_ADDR}/{PREFIX_LEN}")
            # Forwarding has started once testpmd prints its first statistics.
            bl.wait_for_output(frontend, "Port statistics", timeout=30.0)
            bp.ping(self.ns_guest, HOST_ADDR)

            server = self._spawn(
                "iperf3 server",
                [
                    *bl.netns_exec(self.ns_host),
                    *self._iperf_pin(bl.BACKEND_CPU),
                    "iperf3",
                    "-s",
                    "-1",
                    "-B",
                    HOST_ADDR,
                    "-p",
                    str(IPERF_PORT),
                ],
            )
            bp.wait_for_listener(self.ns_host, IPERF_PORT, server, timeout=10.0)
            client = self._spawn(
                "iperf3 client",
                [
                    *bl.netns_exec(self.ns_guest),
                    *self._iperf_pin(bl.FRONTEND_CPU),
                    "iperf3",
                    "-c",
                    HOST_ADDR,
                    "-p",
                    str(IPERF_PORT),
                    "-t",
                    f"{self.seconds:g}",
                    "-O",
                    str(OMIT_S),
                    "-P",
                    str(self.streams),
                    "-J",
                    "--connect-timeout",
                    "5000",
                    *(["-R"] if self.direction == "in" else []),
                ],
            )
            # The backend's CPU time (all threads, user + system, including the host
            # kernel's receive path run inside its writes) over the measured seconds.
            cpu0 = bp.sample_cpu(backend, client, wait=OMIT_S + 0.5)
            code = bl.wait_exit(client, timeout=self.seconds + OMIT_S + 30.0)
            cpu1 = bl.cpu_seconds(backend.pid)
            if cpu0 is not None and cpu1 is not None and cpu1[1] > cpu0[1]:
                row.backend_cpu = (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1])
            sent, received, retr = bp.parse_iperf(client, code)
            row.sender_gbps = sent / 1e9
            row.receiver_gbps = received / 1e9
            row.retransmits = retr
            for proc in (frontend, backend):
                if not proc.alive():
                    raise bl.BenchError(
                        f"{proc.name} exited (status {proc.popen.returncode}) during the run; "
                        f"last output:\n{proc.tail()}"
                    )
            taps = [bl.link_drops(self.ns_guest, GUEST_IF), bl.link_drops(self.ns_host, HOST_IF)]
            row.tap_dropped = sum(t for t in taps if t is not None)
            if self.backend == "trionet":
                row.be_dropped = bp.trionet_drops(self.control)
            bl.stop(frontend, grace=10.0)
            stats = bl.parse_forward_stats(frontend.snapshot())
            if stats.found:
                row.fe_dropped = stats.tx_dropped
            if self.backend == "dpdk":
                bl.stop(backend, grace=10.0)
                stats = bl.parse_forward_stats(backend.snapshot())
                if stats.found:
                    row.be_dropped = stats.tx_dropped
        except bl.BenchError as exc:
            row.error = str(exc)
        finally:
            self.cleanup()
        return row

    def cleanup(self) -> None:
        # iperf3 first, then the frontend (it disconnects from the backend), then the
        # backend; each by pid.
        for proc in reversed(self.procs):
            bl.stop(proc, grace=8.0)
        for ns in self.namespaces:
            subprocess.run(
                ["ip", "netns", "delete", ns],
                capture_output=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        self.namespaces = []
        bl.remove_dpdk_runtime_dir(self.fe_prefix)
        bl.remove_dpdk_runtime_dir(self.be_prefix)
        for path in (self.sock, self.control):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# --------------------------------------------------------------------------- API


_SEQ = 0


def run_tcp(
    workdir: Path,
    python: str,
    seconds: float,
    streams: int,
    trionet_args: list[str],
    *,
    backends: Sequence[str] = BACKENDS,
    directions: Sequence[str] = ("out",),
    pin_iperf: bool = False,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    progress: bool = False,
) -> list[TcpRow]:
    """Run iperf3 through each backend in each direction (see the module docstring).

    `python` runs trionet (with the repository on PYTHONPATH); `trionet_args` are
    appended to its command line (tools/bench passes ``--threads``).  By default
    only the "out" direction runs, giving one row per backend; pass
    ``directions=DIRECTIONS`` for "in" as well.  Returns one row per (direction,
    backend), trionet before dpdk, with the ratio filled in on trionet rows when
    both ran.  Failures are reported in ``TcpRow.error``; this function raises only
    on bad arguments (ValueError).  Each run takes about `seconds` + 5 s; process
    logs go to `workdir`.
    """
    global _SEQ
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; choose from {BACKENDS}")
    for direction in directions:
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")
    if seconds <= 0 or streams < 1:
        raise ValueError("seconds must be > 0 and streams >= 1")
    if queue_size < 64 or queue_size & (queue_size - 1):
        raise ValueError(f"queue_size must be a power of two >= 64, not {queue_size}")
    rows: list[TcpRow] = []
    for direction in directions:
        for backend in (b for b in BACKENDS if b in backends):
            _SEQ += 1
            if progress:
                print(
                    f"tcp {backend} {direction} {seconds:g} s x{streams} ...",
                    end=" ",
                    file=sys.stderr,
                    flush=True,
                )
            busy = bl.cpu_busy_fraction(0.5)
            row = _Run(
                workdir=workdir,
                seq=_SEQ,
                backend=backend,
                direction=direction,
                python=python,
                seconds=seconds,
                streams=streams,
                trionet_args=trionet_args,
                pin_iperf=pin_iperf,
                queue_size=queue_size,
            ).run()
            row.busy_before = busy
            if progress:
                print(
                    "FAILED" if row.error else f"{fmt(row.receiver_gbps)} Gbit/s",
                    file=sys.stderr,
                )
            rows.append(row)
    for r in rows:
        if r.backend != "trionet" or r.receiver_gbps is None:
            continue
        for base in rows:
            if base.backend == "dpdk" and base.direction == r.direction and base.receiver_gbps:
                r.ratio = r.receiver_gbps / base.receiver_gbps
    return rows


def check_prereqs() -> list[str]:
    """What is missing on this machine for run_tcp (empty if nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, taps)")
    for tool in (bl.TESTPMD, "iperf3", "ip", "ss", "taskset"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found in PATH")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun is missing")
    cpus = os.sched_getaffinity(0)
    if not {bl.BACKEND_CPU, bl.FRONTEND_CPU} <= cpus:
        problems.append(f"needs CPUs {bl.BACKEND_CPU} and {bl.FRONTEND_CPU}; have {sorted(cpus)}")
    return problems


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: Sequence[TcpRow]) -> None:
    hdr = (
        f"{'backend':<8} {'dir':<4} {'streams':>7} {'sender':>8} {'receiver':>8} "
        f"{'retrans':>8} {'fe_drop':>8} {'be_drop':>8} {'tapdrop':>8} {'be_cpu':>6} "
        f"{'ratio':>6} {'busy':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r.error:
            print(f"{r.backend:<8} {r.direction:<4} {r.streams:>7} {'FAILED':>8}")
            continue
        print(
            f"{r.backend:<8} {r.direction:<4} {r.streams:>7} {fmt(r.sender_gbps):>8} "
            f"{fmt(r.receiver_gbps):>8} {fmt(r.retransmits, 'd'):>8} "
            f"{fmt(r.fe_dropped, 'd'):>8} {fmt(r.be_dropped, 'd'):>8} "
            f"{fmt(r.tap_dropped, 'd'):>8} {fmt(r.backend_cpu):>6} {fmt(r.ratio):>6} "
            f"{fmt(r.busy_before and 100 * r.busy_before, '.0f'):>4}%"
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/benchtcp.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=10.0, help="iperf3 -t (default 10)")
    p.add_argument("--streams", type=int, default=1, help="iperf3 -P (default 1)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="trionet,dpdk")
    p.add_argument("--directions", default="out,in", help="out, in or out,in (default both)")
    p.add_argument("--python", default=None, help="interpreter for trionet (default: venv)")
    p.add_argument("--trionet-args", default="--threads", help="(default: --threads)")
    p.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        help=f"virtio ring size (default {DEFAULT_QUEUE_SIZE})",
    )
    p.add_argument(
        "--pin-iperf", action="store_true", help="iperf3 server on CPU 0, client on CPU 1"
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    problems = check_prereqs()
    if problems:
        print("benchtcp: " + "; ".join(problems), file=sys.stderr)
        return 2
    python = args.python
    if python is None:
        python = bl.venv_python(REPO)
    busy = bl.cpu_busy_fraction(1.0)
    if busy > 0.2:
        print(
            f"benchtcp: warning: CPUs are {100 * busy:.0f}% busy before the runs; other work "
            "on the machine will distort the figures",
            file=sys.stderr,
        )
    workdir = Path(tempfile.mkdtemp(prefix="trionet-benchtcp-"))
    t0 = time.monotonic()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rows = run_tcp(
            workdir,
            python,
            args.seconds,
            args.streams,
            args.trionet_args.split(),
            backends=[x for x in args.backends.split(",") if x],
            directions=[x for x in args.directions.split(",") if x],
            pin_iperf=args.pin_iperf,
            queue_size=args.queue_size,
            progress=True,
        )
    except ValueError as exc:
        print(f"benchtcp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchtcp: interrupted", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        bl.stop_all()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"git revision: {bl.git_revision(REPO)}   DPDK: {bl.dpdk_version()}")
    print(
        f"TCP through the backend (CPU {bl.BACKEND_CPU}) from a DPDK virtio-user frontend "
        f"(CPU {bl.FRONTEND_CPU}); iperf3 "
        + ("server on CPU 0, client on CPU 1" if args.pin_iperf else "unpinned")
        + f"; virtio rings of {args.queue_size}; Gbit/s of TCP payload, first {OMIT_S} s "
        "omitted; busy = all CPUs' load just before each run (see --help)"
    )
    print()
    print_table(rows)
    print(f"\nwall time {time.monotonic() - t0:.0f} s")
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"\nFAILED {r.backend} {r.direction}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
