"""Tap benchmark for tools/bench: trionet's tap backend against the raw tap write ceiling.

Two measurements per frame size, made the same way:

  ceiling      tools/tapflood.c (compiled into the work directory at run time) writes
               SIZE-byte frames into a tap queue fd, one write() per frame, as fast as one
               thread can, pinned to CPU 0.  This is the kernel's own ceiling for the path
               trionet drives.
  trionet-tap  ``python -m trionet --backend tap --queue-pairs 1 TRIONET_ARGS``, pinned to
               CPU 0, serving a DPDK testpmd virtio-user frontend pinned to CPU 1 that runs
               --forward-mode=txonly --txpkts=SIZE: every frame the guest transmits is
               written by trionet into its tap queue fd.

Both run in a fresh network namespace that holds only ``lo`` and the tap, created up
front as ``ip tuntap add mode tap multi_queue vnet_hdr`` and set up, so the queue fds are
opened exactly as trionet opens them (O_NONBLOCK, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR |
IFF_MULTI_QUEUE, TUNSETVNETHDRSZ 12, TUNSETOFFLOAD 0; tapflood -v -m) and the frames
are the same: testpmd's txonly IPv4/UDP frame to MAC 02:00:00:00:00:00, which is not
the tap's address, so the kernel counts it and drops it early (PACKET_OTHERHOST in
ip_rcv).  No frame leaves the namespace.

Definitions (million frames per second):

  mpps         frames the kernel took in through the tap's queue fd per second: the tap's
               rx_packets counter (read from /proc/PID/net/dev of the process under test,
               i.e. inside the namespace) over a window of at least DURATION seconds that
               starts WARMUP seconds after the counter first moved.
  sender_mpps  the sender's own figure, for reference: tapflood's frames / seconds over
               its whole run; for trionet-tap the frontend testpmd's TX-packets rate between
               its once-a-second stats samples nearest the window (frames the guest got
               onto its TX ring).
  ratio        trionet-tap mpps / ceiling mpps at the same size (trionet-tap rows only).

Frame size is the testpmd --txpkts length (Ethernet header + payload, no FCS); the 12-byte
virtio-net header in front of every frame is not counted.  Ceiling and trionet runs
alternate size by size.

Use from tools/bench::

    import benchtap
    rows = benchtap.run_tap_ceiling(workdir, python, [64, 1500], warmup=2.0,
                                    duration=5.0, trionet_args=["--threads"])
    print(benchtap.format_table(rows))

``run_tap_ceiling`` never raises for a failed run: the row carries ``error`` instead.
It needs root, /dev/net/tun, iproute2, a C compiler (cc) and dpdk-testpmd.  Every
process is stopped by pid and each namespace deleted before it returns.
Standalone: ``python3 tools/benchtap.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
TAPFLOOD_SRC = TOOLS / "tapflood.c"
TAP_NAME = "tnbench0"
SAMPLE_INTERVAL = 0.25  # seconds between tap counter reads inside the window
START_TIMEOUT = 45.0  # seconds for traffic to appear on the tap
CMD_TIMEOUT = 20.0  # seconds for one ip / cc command

CEILING = "ceiling"
TRIONET = "trionet-tap"


@dataclass
class TapRow:
    """One measurement; see the module docstring for the definitions."""

    what: str  # CEILING or TRIONET
    size: int
    mpps: float | None = None
    ratio: float | None = None
    sender_mpps: float | None = None
    window_s: float = 0.0
    spread: str = ""  # min..max Mpps of the per-sample intervals inside the window
    tap_rx_dropped: int = 0  # rx_dropped delta of the tap over the window
    method: str = ""
    error: str | None = None


# --------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], what: str) -> str:
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise bl.BenchError(f"{what}: {exc}") from exc
    if res.returncode != 0:
        raise bl.BenchError(
            f"{what}: {' '.join(argv)} exited with status {res.returncode}: "
            f"{(res.stderr or res.stdout).strip()}"
        )
    return res.stdout


def build_tapflood(workdir: Path) -> Path:
    """Compile tools/tapflood.c into `workdir`; return the binary's path."""
    return bl.build_c_tool(TAPFLOOD_SRC, workdir)


@contextlib.contextmanager
def tap_namespace(name: str, tap: str) -> Iterator[str]:
    """A fresh network namespace holding `lo` and a persistent multi-queue vnet_hdr tap,
    both up.  Deleted on exit (which also removes the tap)."""
    _run(["ip", "netns", "add", name], f"create namespace {name}")
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"], "set lo up")
        tuntap = ["tuntap", "add", "mode", "tap", "multi_queue", "vnet_hdr", "name", tap]
        _run(["ip", "-n", name, *tuntap], f"create tap {tap}")
        _run(["ip", "-n", name, "link", "set", tap, "up"], f"set {tap} up")
        yield name
    finally:
        with contextlib.suppress(bl.BenchError):
            _run(["ip", "netns", "del", name], f"delete namespace {name}")


def netns_prefix(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def wait_in_netns(proc: bl.Proc, ns: str, timeout: float = 10.0) -> None:
    """Wait until `proc` (started through ``ip netns exec``) has entered namespace `ns`."""
    want = os.stat(f"/run/netns/{ns}").st_ino
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want:
                return
        _check_alive([proc])
        if time.monotonic() > deadline:
            raise bl.BenchError(f"{proc.name} did not enter namespace {ns} within {timeout:g} s")
        time.sleep(0.01)


@dataclass
class _Count:
    t: float
    rx: int
    dropped: int


def read_tap_counters(pid: int, tap: str) -> _Count:
    """The tap's rx packets/dropped as seen from the network namespace of `pid`."""
    t0 = time.monotonic()
    try:
        text = Path(f"/proc/{pid}/net/dev").read_text()
    except OSError as exc:
        raise bl.BenchError(f"read /proc/{pid}/net/dev: {exc}") from exc
    t1 = time.monotonic()
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == tap:
            fields = rest.split()
            return _Count((t0 + t1) / 2, int(fields[1]), int(fields[3]))
    raise bl.BenchError(f"no {tap} in /proc/{pid}/net/dev")


@dataclass
class _Window:
    pps: float
    t0: float
    t1: float
    dropped: int
    intervals: list[float] = field(default_factory=list)


def _check_alive(procs: Sequence[bl.Proc]) -> None:
    for p in procs:
        if not p.alive():
            raise bl.BenchError(
                f"{p.name} exited with status {p.popen.returncode} during the run; "
                f"last output:\n{p.tail()}"
            )


def _sleep_until(t: float, procs: Sequence[bl.Proc]) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
        _check_alive(procs)


def measure_tap(
    pid: int, tap: str, procs: Sequence[bl.Proc], warmup: float, duration: float
) -> _Window:
    """Wait for the tap's rx_packets to move, skip `warmup` s, then average over at least
    `duration` s of samples taken every SAMPLE_INTERVAL s."""
    deadline = time.monotonic() + START_TIMEOUT
    while read_tap_counters(pid, tap).rx == 0:
        _check_alive(procs)
        if time.monotonic() > deadline:
            raise bl.BenchError(
                f"no frames reached {tap} within {START_TIMEOUT:.0f} s; last output:\n"
                + "\n".join(p.tail(10) for p in procs)
            )
        time.sleep(0.05)
    _sleep_until(time.monotonic() + warmup, procs)
    samples = [read_tap_counters(pid, tap)]
    while samples[-1].t < samples[0].t + duration:
        _sleep_until(samples[-1].t + SAMPLE_INTERVAL, procs)
        samples.append(read_tap_counters(pid, tap))
    first, last = samples[0], samples[-1]
    return _Window(
        pps=(last.rx - first.rx) / (last.t - first.t),
        t0=first.t,
        t1=last.t,
        dropped=last.dropped - first.dropped,
        intervals=[(b.rx - a.rx) / (b.t - a.t) for a, b in itertools.pairwise(samples)],
    )


def _fill(row: TapRow, win: _Window, method: str) -> None:
    row.mpps = win.pps / 1e6
    row.window_s = win.t1 - win.t0
    row.tap_rx_dropped = win.dropped
    if win.intervals:
        row.spread = f"{min(win.intervals) / 1e6:.3f}..{max(win.intervals) / 1e6:.3f}"
    row.method = method
    if win.pps <= 0:
        raise bl.BenchError("the tap counter stopped moving during the window")


def _method(warmup: float, duration: float) -> str:
    return (
        f"tap rx_packets delta in a private netns over >= {duration:g} s after {warmup:g} s warmup"
    )


# --------------------------------------------------------------------------- runs


class _Runner:
    def __init__(
        self,
        workdir: Path,
        python: str,
        warmup: float,
        duration: float,
        trionet_args: Sequence[str],
    ) -> None:
        self.workdir = workdir
        self.python = python
        self.warmup = warmup
        self.duration = duration
        self.trionet_args = list(trionet_args)
        self.seq = 0
        self.tapflood: Path | None = None

    def _ns_name(self) -> str:
        self.seq += 1
        return f"tnbt{os.getpid()}n{self.seq}"

    def ceiling(self, size: int) -> TapRow:
        row = TapRow(CEILING, size)
        try:
            if self.tapflood is None:
                self.tapflood = build_tapflood(self.workdir)
            with tap_namespace(self._ns_name(), TAP_NAME) as ns:
                self._ceiling(ns, size, row)
        except bl.BenchError as exc:
            row.error = str(exc)
        return row

    def _ceiling(self, ns: str, size: int, row: TapRow) -> None:
        assert self.tapflood is not None
        seconds = self.warmup + self.duration + START_TIMEOUT
        argv = [
            *netns_prefix(ns),
            *bl.cpu_pin_prefix(bl.BACKEND_CPU),
            str(self.tapflood),
            "-v",
            "-m",
            TAP_NAME,
            str(size),
            f"{seconds:g}",
        ]
        proc = bl.spawn("tapflood", argv, self.workdir / f"ceiling-{size}.log")
        try:
            wait_in_netns(proc, ns)
            win = measure_tap(proc.pid, TAP_NAME, [proc], self.warmup, self.duration)
            _fill(row, win, _method(self.warmup, self.duration) + "; writer: tapflood -v -m")
            code = bl.stop(proc, grace=5.0)
            text = "\n".join(ln.text for ln in proc.snapshot())
            m = re.search(r"frames=(\d+) errors=(\d+) seconds=([\d.]+) pps=(\d+)", text)
            if code != 0 or m is None:
                raise bl.BenchError(
                    f"tapflood exited with status {code}; last output:\n{proc.tail()}"
                )
            row.sender_mpps = int(m.group(4)) / 1e6
            if int(m.group(2)):
                raise bl.BenchError(f"tapflood: {m.group(2)} writes failed:\n{proc.tail()}")
        finally:
            bl.stop(proc, grace=5.0)

    def trionet(self, size: int) -> TapRow:
        row = TapRow(TRIONET, size)
        try:
            with tap_namespace(self._ns_name(), TAP_NAME) as ns:
                self._trionet(ns, size, row)
        except bl.BenchError as exc:
            row.error = str(exc)
        return row

    def _trionet(self, ns: str, size: int, row: TapRow) -> None:
        sock = self.workdir / f"tap{self.seq}.sock"
        fe_prefix = f"tnbt{os.getpid()}r{self.seq}f"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        argv = [
            *netns_prefix(ns),
            *bl.cpu_pin_prefix(bl.BACKEND_CPU),
            self.python,
            "-m",
            "trionet",
            "--socket-path",
            str(sock),
            "--backend",
            "tap",
            "--tap",
            TAP_NAME,
            "--queue-pairs",
            "1",
            *self.trionet_args,
        ]
        backend: bl.Proc | None = None
        frontend: bl.Proc | None = None
        try:
            backend = bl.spawn("trionet", argv, self.workdir / f"trionet-{size}.log", env=env)
            bl.wait_for_socket(sock, backend, timeout=30.0)
            wait_in_netns(backend, ns)
            fe_argv = bl.testpmd_argv(
                cpu=bl.FRONTEND_CPU,
                prefix=fe_prefix,
                vdev=f"net_virtio_user0,path={sock},queues=1",
                app_args=[
                    "--rxq=1",
                    "--txq=1",
                    "--forward-mode=txonly",
                    f"--txpkts={size}",
                    "--stats-period=1",
                ],
            )
            frontend = bl.spawn(
                "frontend virtio-user testpmd", fe_argv, self.workdir / f"frontend-{size}.log"
            )
            win = measure_tap(
                backend.pid, TAP_NAME, [backend, frontend], self.warmup, self.duration
            )
            _fill(
                row,
                win,
                _method(self.warmup, self.duration)
                + f"; frontend testpmd txonly on CPU {bl.FRONTEND_CPU}",
            )
            row.sender_mpps = _frontend_tx_mpps(frontend, win)
        finally:
            if frontend is not None:
                bl.stop(frontend, grace=10.0)
            if backend is not None:
                bl.stop(backend, grace=8.0)
            bl.remove_dpdk_runtime_dir(fe_prefix)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()


def _frontend_tx_mpps(frontend: bl.Proc, win: _Window) -> float | None:
    """The frontend's TX rate between its first and last stats sample within half a
    second of the window (stats come about once a second; None if fewer than two)."""
    lo, hi = win.t0 - 0.5, win.t1 + 0.5
    deadline = time.monotonic() + 2.0
    while True:
        inside = [s for s in bl.parse_port_stats(frontend.snapshot()) if lo <= s.t <= hi]
        if (len(inside) >= 2 and time.monotonic() > hi) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    return (b.tx - a.tx) / (b.t - a.t) / 1e6


def run_tap_ceiling(
    workdir: Path,
    python: str,
    sizes: list[int],
    warmup: float,
    duration: float,
    trionet_args: list[str],
) -> list[TapRow]:
    """Measure the raw tap write ceiling and trionet's tap backend at each size.

    Returns, per size, a CEILING row then a TRIONET row (with ``ratio``).  Logs and
    sockets go into `workdir`; `python` runs trionet (PYTHONPATH gets the repository).
    """
    runner = _Runner(workdir, python, warmup, duration, trionet_args)
    rows: list[TapRow] = []
    for size in sizes:
        ceil = runner.ceiling(size)
        tri = runner.trionet(size)
        if tri.mpps is not None and ceil.mpps:
            tri.ratio = tri.mpps / ceil.mpps
        rows += [ceil, tri]
    return rows


def format_table(rows: Sequence[TapRow]) -> str:
    hdr = (
        f"{'what':<12} {'size':>5} {'mpps':>7} {'ratio':>6} {'sender':>7} {'window':>7}"
        f"  per-interval"
    )
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        if r.error:
            out.append(f"{r.what:<12} {r.size:>5} {'FAILED':>7}")
            continue
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        sender = "-" if r.sender_mpps is None else f"{r.sender_mpps:.3f}"
        out.append(
            f"{r.what:<12} {r.size:>5} {r.mpps or 0:>7.3f} {ratio:>6} {sender:>7} "
            f"{r.window_s:>6.1f}s  {r.spread}"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/benchtap.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="64,1500", help="frame sizes (default 64,1500)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--python", default=None, help="interpreter for trionet (default: venv)")
    p.add_argument("--trionet-args", default="--threads", help="extra trionet arguments")
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    python = args.python
    if python is None:
        python = bl.venv_python(REPO)
    if os.geteuid() != 0:
        print("benchtap: needs root (network namespaces, /dev/net/tun)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="trionet-benchtap-"))

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rows = run_tap_ceiling(
            workdir, python, sizes, args.warmup, args.duration, args.trionet_args.split()
        )
    except KeyboardInterrupt:
        print("benchtap: interrupted", file=sys.stderr)
        return 1
    finally:
        bl.stop_all()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(rows))
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"\nFAILED {r.what} size={r.size}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
