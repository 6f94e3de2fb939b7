"""Helpers for tools/bench: run DPDK testpmd (virtio-user frontend, net_vhost baseline
backend) and trionet, parse testpmd statistics, and clean up reliably; plus what the
namespace rigs of the tcp and udp sections share (short commands, links inside a
namespace, the testpmd net_af_packet <-> virtio-user bridge that plays a guest's driver,
CPU time of a process, small C tools built at run time).

Every process started here gets its own session, is tracked in a registry and is
stopped by pid (SIGINT first, so testpmd prints its final statistics and releases
its vhost-user socket, then SIGTERM, then SIGKILL).  Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TESTPMD = "dpdk-testpmd"
# EAL arguments shared by every testpmd instance: no hugepages, no PCI scan.
EAL_COMMON = ("--no-huge", "-m", "1024", "--no-pci", "--single-file-segments")
EAL_LOG_LEVEL = "--log-level=4"  # warnings and worse

BACKEND_CPU = 0
FRONTEND_CPU = 1

# virtio ring size of the namespace rigs' virtio-user port: the largest ring QEMU's
# virtio-net offers (virtio-user's own default is 256), all of it used (--rxd/--txd;
# see bridge_frontend_argv and tools/benchtcp.py).
VIRTIO_QUEUE_SIZE = 1024
# testpmd application arguments of a two-port io-mode bridge.  --stats-period keeps
# testpmd forwarding with stdin at EOF (without it, testpmd waits for Enter and would
# stop at once); SIGINT ends it.
IO_BRIDGE_ARGS = ("--forward-mode=io", "--port-topology=paired", "--stats-period=1")


class BenchError(RuntimeError):
    """A run failed; the message says which step and why."""


# --------------------------------------------------------------------------- processes


@dataclass
class Line:
    t: float  # time.monotonic() when the line was read
    text: str


@dataclass
class Proc:
    """A child process whose combined stdout/stderr is read line by line, timestamped,
    and also appended to a log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    started: float
    lines: list[Line] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def snapshot(self) -> list[Line]:
        with self.lock:
            return list(self.lines)

    def tail(self, n: int = 25) -> str:
        return "\n".join("    " + ln.text for ln in self.snapshot()[-n:])


_LIVE: dict[int, Proc] = {}


def _read_lines(proc: Proc) -> None:
    assert proc.popen.stdout is not None
    with open(proc.log_path, "ab") as log:
        for raw in proc.popen.stdout:
            log.write(raw)
            log.flush()
            # testpmd clears the screen before every stats block; drop the escapes.
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw.decode(errors="replace")).rstrip()
            with proc.lock:
                proc.lines.append(Line(time.monotonic(), text))


def spawn(
    name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
    started = time.monotonic()
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    except OSError as exc:
        raise BenchError(f"{name}: cannot execute {argv[0]}: {exc}") from exc
    proc = Proc(name=name, argv=list(argv), log_path=log_path, popen=popen, started=started)
    proc.reader = threading.Thread(target=_read_lines, args=(proc,), daemon=True)
    proc.reader.start()
    _LIVE[proc.pid] = proc
    return proc


def stop(proc: Proc, first_signal: int = signal.SIGINT, grace: float = 8.0) -> int | None:
    """Stop one process by pid; escalate to SIGTERM and SIGKILL.  Returns its exit code."""
    try:
        for sig, wait in ((first_signal, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=wait)
        if proc.reader is not None:
            proc.reader.join(timeout=2.0)
        return proc.popen.poll()
    finally:
        _LIVE.pop(proc.pid, None)


def stop_all() -> None:
    for proc in list(_LIVE.values()):
        stop(proc, grace=3.0)


def cpu_pin_prefix(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


def line_buffered_prefix() -> list[str]:
    # testpmd writes stats with stdio; make them arrive line by line through the pipe.
    return ["stdbuf", "-oL"] if shutil.which("stdbuf") else []


def wait_for_socket(path: Path, proc: Proc, timeout: float, poll: float = 0.001) -> float:
    """Wait until `path` is a UNIX socket; return seconds since `proc` was spawned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return time.monotonic() - proc.started
        except FileNotFoundError:
            pass
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with status {proc.popen.returncode} before creating "
                f"{path}; last output:\n{proc.tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} did not create {path} within {timeout:.0f} s; last output:\n"
                f"{proc.tail()}"
            )
        time.sleep(poll)


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


def cpu_busy_fraction(interval: float, exclude: Sequence[int] = ()) -> float:
    """Fraction of all CPUs' time that was not idle/iowait over `interval` seconds,
    less the CPU time the processes `exclude` (pids; all their threads) used meanwhile."""
    tck = os.sysconf("SC_CLK_TCK")

    def read() -> tuple[int, int, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        own = sum(c[0] for pid in exclude if (c := cpu_seconds(pid)) is not None)
        return sum(fields), idle, own * tck

    total0, idle0, own0 = read()
    time.sleep(interval)
    total1, idle1, own1 = read()
    if total1 == total0:
        return 0.0
    return max(0.0, 1.0 - (idle1 - idle0 + own1 - own0) / (total1 - total0))


def dpdk_runtime_dir(prefix: str) -> Path:
    base = "/var/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / prefix


def remove_dpdk_runtime_dir(prefix: str) -> None:
    shutil.rmtree(dpdk_runtime_dir(prefix), ignore_errors=True)


def wait_for_output(proc: Proc, needle: str, timeout: float) -> None:
    """Wait until `proc` has printed a line containing `needle`."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        lines = proc.snapshot()
        if any(needle in ln.text for ln in lines[seen:]):
            return
        seen = len(lines)
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with status {proc.popen.returncode} before printing "
                f"{needle!r}; last output:\n{proc.tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} did not print {needle!r} within {timeout:.0f} s; last output:\n"
                f"{proc.tail()}"
            )
        time.sleep(0.05)


def wait_exit(proc: Proc, timeout: float) -> int:
    """Wait for `proc` to finish on its own; stop it (and fail) after `timeout`."""
    try:
        code = proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, grace=3.0)
        raise BenchError(
            f"{proc.name} did not finish within {timeout:.0f} s; last output:\n{proc.tail()}"
        ) from None
    if proc.reader is not None:
        proc.reader.join(timeout=5.0)
    return code


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user + system CPU seconds of all of `pid`'s threads, monotonic time) or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK"), time.monotonic()


def venv_python(repo: Path) -> str:
    """The interpreter that runs trionet: the repository's .venv, else this one."""
    venv = repo / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def trionet_env(repo: Path) -> dict[str, str]:
    """The environment for ``python -m trionet`` run from the repository `repo`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def build_c_tool(src: Path, workdir: Path) -> Path:
    """Compile the one-file C program `src` into `workdir`; return the binary's path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError(f"no C compiler (cc) to build {src.name}")
    out = workdir / src.stem
    run_cmd([cc, "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], f"build {src.stem}", 60.0)
    return out


# --------------------------------------------------------------------------- namespaces


def run_cmd(argv: Sequence[str], what: str, timeout: float = 10.0) -> str:
    """Run a short command to completion; BenchError with its output if it fails."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: '{' '.join(argv)}' timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise BenchError(f"{what}: cannot execute {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        out = (done.stderr or done.stdout).strip()
        raise BenchError(f"{what}: '{' '.join(argv)}' exited {done.returncode}: {out}")
    return done.stdout


def netns_exec(ns: str) -> list[str]:
    """Command prefix that runs the rest of a command line in named namespace `ns`."""
    return ["ip", "netns", "exec", ns]


def link_exists(ns: str, ifname: str) -> bool:
    return (
        subprocess.run(
            ["ip", "-n", ns, "link", "show", "dev", ifname],
            capture_output=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        ).returncode
        == 0
    )


def wait_for_link(ns: str, ifname: str, owner: Proc, timeout: float) -> None:
    """Wait until `owner` (the process that creates it) has made `ifname` in `ns`."""
    deadline = time.monotonic() + timeout
    while not link_exists(ns, ifname):
        if not owner.alive():
            raise BenchError(
                f"{owner.name} exited with status {owner.popen.returncode} before creating "
                f"{ifname}; last output:\n{owner.tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchError(
                f"{owner.name} did not create {ifname} in namespace {ns} within "
                f"{timeout:.0f} s; last output:\n{owner.tail()}"
            )
        time.sleep(0.05)


def configure_link(
    ns: str, ifname: str, cidr: str, *, mtu: int | None = None, gateway: str | None = None
) -> None:
    """Bring up `lo` and `ifname` in `ns` with address `cidr` (ADDR/PREFIX), optionally
    an MTU and a default route via `gateway`."""
    run_cmd(["ip", "-n", ns, "link", "set", "dev", "lo", "up"], "loopback up")
    run_cmd(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname], "add address")
    if mtu is not None:
        run_cmd(["ip", "-n", ns, "link", "set", "dev", ifname, "mtu", str(mtu)], "set MTU")
    run_cmd(["ip", "-n", ns, "link", "set", "dev", ifname, "up"], f"set {ifname} up")
    if gateway is not None:
        run_cmd(["ip", "-n", ns, "route", "add", "default", "via", gateway], "default route")


def link_drops(ns: str, ifname: str) -> int | None:
    """RX + TX frames the kernel dropped on `ifname` in `ns` (None if unreadable)."""
    try:
        out = run_cmd(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifname], "link stats")
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["dropped"]) + int(stats["tx"]["dropped"])
    except (BenchError, ValueError, KeyError, IndexError, TypeError):
        return None


# --------------------------------------------------------------------------- testpmd


def testpmd_argv(
    *,
    cpu: int,
    prefix: str,
    vdev: str,
    app_args: Sequence[str],
) -> list[str]:
    """testpmd with a main lcore and one forwarding lcore, both on `cpu`."""
    return [
        *cpu_pin_prefix(cpu),
        *line_buffered_prefix(),
        TESTPMD,
        "--lcores",
        f"0@{cpu},1@{cpu}",
        *EAL_COMMON,
        f"--file-prefix={prefix}",
        EAL_LOG_LEVEL,
        "--vdev",
        vdev,
        "--",
        "--nb-cores=1",
        *app_args,
    ]


def with_extra_vdevs(argv: list[str], vdevs: Sequence[str]) -> list[str]:
    """Insert more `--vdev X` EAL arguments into a testpmd_argv() command line."""
    sep = argv.index("--")
    extra = [a for v in vdevs for a in ("--vdev", v)]
    return [*argv[:sep], *extra, *argv[sep:]]


# The bridge's tx retry: a guest's driver that finds its TX ring full stops its queue
# and the kernel holds the frames, it does not drop them; testpmd's io mode would.  It
# waits up to 50 ms (500 x 100 us): with 4 ms, a backend whose host socket was full
# for longer (it must not take more guest data then) still saw 60-120 frames of a
# 5 s guest -> host TCP run dropped, and retransmissions.
BRIDGE_COMMANDS = ("set fwd io retry", "set burst tx delay 100 retry 500")
# net_af_packet's PACKET_MMAP rings: frames of up to 2048 bytes (MTU 1500 and the
# tpacket header), twice the virtio ring's entries.
AF_PACKET_FRAME = 2048
AF_PACKET_FRAMES = 2 * VIRTIO_QUEUE_SIZE


def make_guest_link(ns: str, ifname: str) -> str:
    """The kernel side of the bridge in `ns`: a veth pair, `ifname` the guest's
    interface (configured by the caller) and its peer the bridge's, both up and
    without offloads (no segmentation or checksum offload: frames of at most the MTU
    with their checksums, as a tap without a virtio-net header has).  Returns the
    peer's name."""
    peer = ifname + "b"
    run_cmd(
        ["ip", "-n", ns, "link", "add", "name", ifname, "type", "veth", "peer", "name", peer],
        "make the guest's veth pair",
    )
    # The peer sends nothing of its own: net_af_packet also reads a link's outgoing
    # frames, and its IPv6 (router solicitations, MLD) would reach the backend with
    # the peer's MAC, which trionet would take for the guest's.
    run_cmd(
        [*netns_exec(ns), "sysctl", "-q", "-w", f"net.ipv6.conf.{peer}.disable_ipv6=1"],
        f"turn IPv6 off on {peer}",
    )
    for dev in (ifname, peer):
        run_cmd(
            [*netns_exec(ns), "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off",
             "tx", "off", "rx", "off"],
            f"turn {dev}'s offloads off",
        )  # fmt: skip
        run_cmd(["ip", "-n", ns, "link", "set", "dev", dev, "up"], f"set {dev} up")
    return peer


def bridge_frontend_argv(
    *, prefix: str, link: str, sock: Path, queue_size: int = VIRTIO_QUEUE_SIZE
) -> list[str]:
    """testpmd playing a guest's virtio-net driver, on FRONTEND_CPU: port 0 is a
    net_af_packet on `link` (make_guest_link's peer, in the namespace testpmd runs
    in), port 1 a net_virtio_user port on the vhost-user socket `sock`, one queue
    pair, io mode with tx retry (BRIDGE_COMMANDS, written next to `sock`): every
    frame the kernel sends on the guest's interface goes into the virtio TX ring,
    every frame the backend puts in the virtio RX ring comes out of it.

    - Both virtio rings are used whole, as a guest's driver uses them: without
      --rxd/--txd, ethdev's fallback ring size (512) leaves half of a 1024-entry
      ring unused, and a burst the kernel queued while testpmd was descheduled
      overflows the other half (guest -> host TCP lost whole bursts that way).
    - A full virtio TX ring is waited on, not dropped at (a driver stops its queue).
    - Not net_tap: it arms a signal per arriving frame (F_SETSIG), which wakes
      testpmd's idle control threads thousands of times a second on the bridge's
      core; measured, a third of that core.  net_af_packet polls its ring."""
    cmds = sock.with_suffix(".testpmd")
    cmds.write_text("\n".join(BRIDGE_COMMANDS) + "\n")
    rings = (f"--rxd={queue_size}", f"--txd={queue_size}")
    argv = testpmd_argv(
        cpu=FRONTEND_CPU,
        prefix=prefix,
        vdev=(
            f"net_af_packet0,iface={link},qpairs=1,blocksz=4096,framesz={AF_PACKET_FRAME},"
            f"framecnt={AF_PACKET_FRAMES},qdisc_bypass=1"
        ),
        app_args=(*IO_BRIDGE_ARGS, f"--cmdline-file={cmds}", *rings),
    )
    return with_extra_vdevs(
        argv, [f"net_virtio_user0,path={sock},queues=1,queue_size={queue_size}"]
    )


@dataclass
class Sample:
    t: float
    rx: int
    tx: int


_NIC_HDR = re.compile(r"NIC statistics for port (\d+)")
_RX = re.compile(r"^\s*RX-packets:\s*(\d+)")
_TX = re.compile(r"^\s*TX-packets:\s*(\d+)")


def parse_port_stats(lines: Sequence[Line], port: int = 0) -> list[Sample]:
    """Cumulative RX/TX packet counters from testpmd's periodic 'NIC statistics' blocks.
    The timestamp of a sample is when its header line was read (testpmd reads the
    counters just before printing the header)."""
    samples: list[Sample] = []
    cur_t: float | None = None
    rx: int | None = None
    for ln in lines:
        m = _NIC_HDR.search(ln.text)
        if m:
            cur_t = ln.t if int(m.group(1)) == port else None
            rx = None
            continue
        if cur_t is None:
            continue
        if rx is None:
            m = _RX.match(ln.text)
            if m:
                rx = int(m.group(1))
            continue
        m = _TX.match(ln.text)
        if m:
            samples.append(Sample(cur_t, rx, int(m.group(1))))
            cur_t = None
            rx = None
    return samples


_STREAM_HDR = re.compile(r"Forward Stats for RX Port=\s*(\d+)/Queue=\s*(\d+)")
_FWD_HDR = re.compile(r"Forward statistics for port\s+(\d+)")
_ACC_HDR = re.compile(r"Accumulated forward statistics")
_FWD_RX = re.compile(r"RX-packets:\s*(\d+)")
_FWD_TX = re.compile(r"TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)")


@dataclass
class ForwardStats:
    """testpmd's final statistics (printed when forwarding stops)."""

    rx: int = 0
    tx: int = 0
    tx_dropped: int = 0
    per_queue_rx: dict[int, int] = field(default_factory=dict)
    per_queue_tx: dict[int, int] = field(default_factory=dict)
    found: bool = False


def parse_forward_stats(lines: Sequence[Line]) -> ForwardStats:
    out = ForwardStats()
    section: tuple[str, int] | None = None
    for ln in lines:
        text = ln.text
        m = _STREAM_HDR.search(text)
        if m:
            section = ("queue", int(m.group(2)))
            continue
        if _FWD_HDR.search(text):
            section = ("port", 0)
            continue
        if _ACC_HDR.search(text):
            section = ("acc", 0)
            continue
        if section is None:
            continue
        m = _FWD_RX.search(text)
        if m and "RX-dropped" in text:
            if section[0] == "queue":
                out.per_queue_rx[section[1]] = int(m.group(1))
            elif section[0] == "acc":
                out.rx = int(m.group(1))
                out.found = True
            continue
        m = _FWD_TX.search(text)
        if m:
            if section[0] == "queue":
                out.per_queue_tx[section[1]] = int(m.group(1))
            elif section[0] == "acc":
                out.tx = int(m.group(1))
                out.tx_dropped = int(m.group(2))
                section = None
    return out


# --------------------------------------------------------------------------- measuring


@dataclass
class Rates:
    tx_pps: float
    rx_pps: float
    window_s: float
    # per stats-interval rates inside the window, to show how noisy the run was
    tx_intervals: list[float] = field(default_factory=list)
    rx_intervals: list[float] = field(default_factory=list)


def measure_window(
    fe: Proc,
    *,
    backend: Proc | None,
    warmup: float,
    duration: float,
    start_timeout: float,
    need_rx: bool,
    need_tx: bool,
) -> Rates:
    """Wait for traffic on the frontend, skip `warmup` seconds, then average the
    frontend's port counters over at least `duration` seconds of stats samples."""
    deadline_start = fe.started + start_timeout
    t_traffic: float | None = None
    first: Sample | None = None
    while True:
        time.sleep(0.05)
        samples = parse_port_stats(fe.snapshot())
        if not fe.alive():
            raise BenchError(
                f"{fe.name} exited with status {fe.popen.returncode} during the run; "
                f"last output:\n{fe.tail()}"
            )
        if backend is not None and not backend.alive():
            raise BenchError(
                f"{backend.name} exited with status {backend.popen.returncode} during the "
                f"run; last output:\n{backend.tail()}"
            )
        if t_traffic is None:
            for s in samples:
                if (need_tx and s.tx > 0) or (need_rx and s.rx > 0):
                    t_traffic = s.t
                    break
            if t_traffic is None:
                if time.monotonic() > deadline_start:
                    raise BenchError(
                        f"no traffic seen by {fe.name} within {start_timeout:.0f} s of start; "
                        f"last output:\n{fe.tail()}"
                    )
                continue
        if first is None:
            cands = [s for s in samples if s.t >= t_traffic + warmup]
            if cands:
                first = cands[0]
            elif time.monotonic() > t_traffic + warmup + 10.0:
                raise BenchError(f"{fe.name} stopped printing statistics")
            continue
        later = [s for s in samples if s.t >= first.t + duration]
        if later:
            last = later[0]
            dt = last.t - first.t
            inside = [s for s in samples if first.t <= s.t <= last.t]
            pairs = [(a, b) for a, b in itertools.pairwise(inside) if b.t > a.t]
            return Rates(
                tx_pps=(last.tx - first.tx) / dt,
                rx_pps=(last.rx - first.rx) / dt,
                window_s=dt,
                tx_intervals=[(b.tx - a.tx) / (b.t - a.t) for a, b in pairs],
                rx_intervals=[(b.rx - a.rx) / (b.t - a.t) for a, b in pairs],
            )
        if time.monotonic() > first.t + duration + 10.0:
            raise BenchError(f"{fe.name} stopped printing statistics")


def git_revision(repo: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def dpdk_version() -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "dpdk"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
