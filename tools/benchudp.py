"""UDP datagram rates through three user-mode network stacks, with a network namespace
as the guest instead of a VM.

Each stack gets a fresh namespace, made by an unprivileged process (uid 65534,
``unshare --user --map-root-user --net``) and named (``ip netns attach``) for the run;
its kernel stack is the guest, on interface tng0 with a default route via 10.0.2.2,
which every stack maps to the host's 127.0.0.1.  Host port PIN on 127.0.0.1 is
forwarded to the guest.  The host is this machine's own network namespace.

  trionet      python -m trionet --netns HOLDER_PID --netns-ifname tng0 --backend user
               --queue-pairs 1 --address 10.0.2.15/24 --gateway 10.0.2.2 -4 --mtu 1500
               -u 127.0.0.1/PIN:PIN TRIONET_ARGS, started as root (it opens and configures
               the namespace's tap, then drops every capability in its sandbox); it
               serves the namespace's tap itself, as pasta does, through its own
               vhost-user front end (trionet/netns/).
  pasta        pasta -f -q -4 --config-net -I tng0 -a 10.0.2.15 -n 24 -g 10.0.2.2
               -m 1500 -u 127.0.0.1/PIN -U none -T none -t none HOLDER_PID, as uid
               65534; it joins the namespace and serves its tap itself.
  slirp4netns  slirp4netns --configure --mtu=1500 --api-socket=PATH HOLDER_PID tng0,
               as uid 65534, then add_hostfwd udp 127.0.0.1:PIN -> 10.0.2.100:PIN on
               the API socket (10.0.2.100 is the address --configure gives the guest).

Traffic: tools/udpflood.c, compiled into the work directory (iperf3 needs a TCP
control connection; trionet's user stack carries UDP and ICMP only).  The receiver
counts datagrams (recvmmsg, 4 MiB receive buffer); the sender sends PAYLOAD-byte
datagrams with sendmmsg as fast as its kernel takes them for WARMUP + SECONDS + 1 s.
A short burst out of the guest first checks the path (and lets trionet learn the
guest's MAC).

  out  guest -> host: sender in the namespace to 10.0.2.2:POUT, receiver on the
       host's 127.0.0.1:POUT.
  in   host -> guest: sender on the host to 127.0.0.1:PIN, receiver in the namespace
       on PIN.  The sender binds a global address of the host as its source (the
       datagrams still only cross the host's loopback): pasta splices datagrams whose
       source is a loopback address straight to the namespace's loopback, bypassing
       its tap, which a VM guest could not use.

  rx_kpps    datagrams the receiver got per second, in thousands, over SECONDS from
             WARMUP seconds after its first datagram.  The figure.
  rx_mbps    UDP payload Mbit/s over the same window.
  tx_kpps    the sender's datagrams per second (accepted by its kernel): offered load.
  loss       1 - received / sent, whole run (the receiver drains until 0.5 s quiet), %.
  stack_cpu  CPU time of the stack's process (all threads) over the window / its
             length.
  us/dgram   stack_cpu per received datagram, in microseconds: the stack's cost of
             one datagram (for pasta and slirp4netns "in", including the namespace
             kernel's receive path, see below).
  tap_drop   RX + TX drops on tng0 in the namespace during the figure (a tap's
             queue overflowing, or trionet's veth peer: nobody read it fast enough).
  fwd_drop   "in": drops at the stack's socket on 127.0.0.1:PIN (its receive buffer
             full: the stack did not read fast enough).
  sock_drop  drops at the receiver's own socket: above 0, the receiver was too slow.
  vs_pasta, vs_slirp
             trionet rx_kpps / that stack's, same direction and payload.
  busy       all CPUs' busy fraction just before the figure, less this run's own
             processes: anything well above 0 distorts the figures.

CPU placement (2 CPUs): the stack on CPU 0, sender and receiver on CPU 1.  Every
stack serves the namespace's tap itself; its tap writes run the namespace kernel's
receive path on CPU 0.  tx_kpps, stack_cpu and the drop columns show which side
limited a figure.

Every step has a timeout; every process is started in its own session and stopped by
pid; namespaces and work directories are removed afterwards.  No
datagram goes anywhere but 127.0.0.1 and the namespaces made here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
UDPFLOOD_SRC = TOOLS / "udpflood.c"

STACKS = ("trionet", "pasta", "slirp4netns")
DIRECTIONS = ("out", "in")
PAYLOADS = (64, 1400)

GUEST_IF = "tng0"
GATEWAY = "10.0.2.2"
PREFIX_LEN = 24
GUEST_ADDR = {"trionet": "10.0.2.15", "pasta": "10.0.2.15", "slirp4netns": "10.0.2.100"}
MTU = 1500
UNPRIVILEGED_UID = 65534
UNPRIVILEGED = f"setpriv --reuid={UNPRIVILEGED_UID} --regid={UNPRIVILEGED_UID} --clear-groups"
START_TIMEOUT = 10.0  # seconds for the first datagram to reach the receiver
SEND_TAIL = 1.0  # seconds the sender goes on after the receiver's window


@dataclass
class UdpRow:
    """One stack, one direction, one payload size; figures are None when it failed."""

    stack: str  # one of STACKS
    direction: str  # "out" (guest -> host) or "in" (host -> guest)
    payload: int  # UDP payload bytes
    seconds: float
    rx_kpps: float | None = None
    rx_mbps: float | None = None
    tx_kpps: float | None = None
    loss_pct: float | None = None
    stack_cpu: float | None = None
    stack_us: float | None = None  # stack CPU microseconds per received datagram
    tap_dropped: int | None = None
    socket_drops: int | None = None
    fwd_dropped: int | None = None  # "in" only
    source: str = ""  # "in" only: the sender's source address
    vs_pasta: float | None = None  # on trionet rows
    vs_slirp4netns: float | None = None  # on trionet rows
    busy_before: float | None = None
    error: str | None = None


# --------------------------------------------------------------------------- helpers


def _free_udp_ports(count: int) -> list[int]:
    """`count` distinct UDP ports that are free on 127.0.0.1 right now."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def _last_json(proc: bl.Proc) -> dict[str, Any] | None:
    for ln in reversed(proc.snapshot()):
        if ln.text.startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(ln.text)
                return data if isinstance(data, dict) else None
    return None


def _sleep_until(deadline: float, watched: Sequence[bl.Proc]) -> None:
    """Sleep until `deadline`; BenchError if one of `watched` exits unexpectedly."""
    while (left := deadline - time.monotonic()) > 0:
        for proc in watched:
            if not proc.alive():
                raise bl.BenchError(
                    f"{proc.name} exited with status {proc.popen.returncode} during the run; "
                    f"last output:\n{proc.tail()}"
                )
        time.sleep(min(left, 0.05))


def _loopback_socket_drops(port: int) -> int | None:
    """Datagrams dropped at the sockets bound to 127.0.0.1:`port` in this namespace
    (a full receive buffer), from /proc/net/udp; None if there is no such socket."""
    want = f"0100007F:{port:04X}"
    found = None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want:
                found = (found or 0) + int(fields[-1])
    return found


def _host_source_address() -> str:
    """A global IPv4 address of this host, the source of the "in" datagrams (see the
    module docstring); 127.0.0.1 if there is none."""
    try:
        out = bl.run_cmd(["ip", "-4", "-j", "addr", "show", "scope", "global"], "addresses")
        for link in json.loads(out):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet" and a.get("local"):
                    return str(a["local"])
    except (bl.BenchError, ValueError, TypeError, AttributeError):
        pass
    return "127.0.0.1"


def _wait_for_address(ns: str, ifname: str, addr: str, owner: bl.Proc, timeout: float) -> None:
    """Wait until `owner` has configured `addr` on `ifname` in `ns`."""
    deadline = time.monotonic() + timeout
    show = ["ip", "-n", ns, "-j", "addr", "show", "dev", ifname]
    while True:
        with contextlib.suppress(bl.BenchError, ValueError, KeyError, IndexError, TypeError):
            if addr in [a["local"] for a in json.loads(bl.run_cmd(show, "show"))[0]["addr_info"]]:
                return
        if not owner.alive():
            raise bl.BenchError(
                f"{owner.name} exited with status {owner.popen.returncode} before setting "
                f"up {ifname}; last output:\n{owner.tail()}"
            )
        if time.monotonic() > deadline:
            raise bl.BenchError(
                f"{owner.name} did not put {addr} on {ifname} in namespace {ns} within "
                f"{timeout:.0f} s; last output:\n{owner.tail()}"
            )
        time.sleep(0.05)


def _slirp_api(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request on slirp4netns' API socket; BenchError unless it succeeds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise bl.BenchError(f"slirp4netns did not create its API socket {path}")
        time.sleep(0.05)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(request).encode())
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        reply = json.loads(b"".join(chunks))
    except (OSError, ValueError) as exc:
        raise bl.BenchError(f"slirp4netns API {request['execute']}: {exc}") from exc
    if not isinstance(reply, dict) or "error" in reply:
        raise bl.BenchError(f"slirp4netns API {request['execute']}: {reply}")
    return reply


# --------------------------------------------------------------------------- one stack


class _Stack:
    """One stack: its namespace, its processes, the figures measured through it."""

    def __init__(
        self,
        *,
        name: str,
        workdir: Path,
        flood: Path,
        seq: int,
        python: str,
        trionet_args: Sequence[str],
        in_source: str,
        mtu: int = MTU,
    ) -> None:
        tag = f"tnudp{os.getpid()}r{seq}"
        self.name = name
        self.ns = tag + "g"
        self.logbase = workdir / f"udp-{name}-{seq}"
        self.flood = flood
        self.python = python
        self.trionet_args = list(trionet_args)
        self.guest_addr = GUEST_ADDR[name]
        self.out_port, self.in_port = _free_udp_ports(2)
        self.in_source = in_source
        self.mtu = mtu
        self.procs: list[bl.Proc] = []
        self.named = False
        self.rundir: Path | None = None  # writable by the unprivileged user
        self.stack: bl.Proc | None = None
        self.watched: list[bl.Proc] = []  # must stay alive while measuring

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> bl.Proc:
        proc = bl.spawn(name, argv, self.logbase.with_suffix(f".{name.split()[0]}.log"), env=env)
        self.procs.append(proc)
        return proc

    # ---------------------------------------------------------------- setup

    def make_namespace(self) -> bl.Proc:
        argv = f"{UNPRIVILEGED} unshare --user --map-root-user --net sleep 86400".split()
        holder = self._spawn("holder (namespace)", argv)
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 10.0
        while True:
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{holder.pid}/ns/net").st_ino != own:
                    break
            if not holder.alive() or time.monotonic() > deadline:
                raise bl.BenchError(
                    f"could not make an unprivileged user + network namespace "
                    f"(status {holder.popen.returncode}):\n{holder.tail()}"
                )
            time.sleep(0.01)
        bl.run_cmd(["ip", "netns", "attach", self.ns, str(holder.pid)], "name the namespace")
        self.named = True
        return holder

    def start_trionet(self, holder: bl.Proc) -> None:
        options = (
            f"--backend user --queue-pairs 1 --address {self.guest_addr}/{PREFIX_LEN} "
            f"--gateway {GATEWAY} -4 --mtu {self.mtu} -u 127.0.0.1/{self.in_port}:{self.in_port}"
        ).split()
        where = ["--netns", str(holder.pid), "--netns-ifname", GUEST_IF]
        argv = [
            *bl.cpu_pin_prefix(bl.BACKEND_CPU),
            *(self.python, "-m", "trionet", *where, *options),
            *self.trionet_args,
        ]
        self.stack = self._spawn("trionet", argv, env=bl.trionet_env(REPO))
        _wait_for_address(self.ns, GUEST_IF, self.guest_addr, self.stack, timeout=30.0)

    def start_pasta(self, holder: bl.Proc) -> None:
        options = (
            f"-f -q -4 --config-net -I {GUEST_IF} -a {self.guest_addr} -n {PREFIX_LEN} "
            f"-g {GATEWAY} -m {self.mtu} -u 127.0.0.1/{self.in_port} -U none -T none -t none"
        ).split()
        argv = [
            *bl.cpu_pin_prefix(bl.BACKEND_CPU),
            *UNPRIVILEGED.split(),
            *("pasta", *options, str(holder.pid)),
        ]
        self.stack = self._spawn("pasta", argv)
        _wait_for_address(self.ns, GUEST_IF, self.guest_addr, self.stack, timeout=15.0)

    def start_slirp4netns(self, holder: bl.Proc) -> None:
        assert self.rundir is not None
        api = self.rundir / "slirp4netns.sock"
        argv = [
            *bl.cpu_pin_prefix(bl.BACKEND_CPU),
            *UNPRIVILEGED.split(),
            *("slirp4netns", "--configure", f"--mtu={self.mtu}", f"--api-socket={api}"),
            *(str(holder.pid), GUEST_IF),
        ]
        self.stack = self._spawn("slirp4netns", argv)
        _wait_for_address(self.ns, GUEST_IF, self.guest_addr, self.stack, timeout=15.0)
        forward = {
            "proto": "udp",
            "host_addr": "127.0.0.1",
            "host_port": self.in_port,
            "guest_addr": self.guest_addr,
            "guest_port": self.in_port,
        }
        _slirp_api(api, {"execute": "add_hostfwd", "arguments": forward})

    def setup(self) -> None:
        self.rundir = Path(tempfile.mkdtemp(prefix="trionet-benchudp-"))
        os.chown(self.rundir, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        holder = self.make_namespace()
        self.watched.append(holder)
        if self.name == "trionet":
            self.start_trionet(holder)
        elif self.name == "pasta":
            self.start_pasta(holder)
        else:
            self.start_slirp4netns(holder)
        assert self.stack is not None
        self.watched.append(self.stack)
        # A short burst out of the guest: the path works, and trionet learns the
        # guest's MAC (it answers nothing inbound before the guest has spoken).
        try:
            self.exchange("out", 64, warmup=0.0, seconds=0.2, tail=0.3)
        except bl.BenchError as exc:
            raise bl.BenchError(
                f"no datagram from the guest reached 127.0.0.1:{self.out_port} via {GATEWAY}: {exc}"
            ) from exc

    # ---------------------------------------------------------------- measuring

    def exchange(
        self, direction: str, payload: int, *, warmup: float, seconds: float, tail: float
    ) -> tuple[dict[str, Any], dict[str, Any], float | None]:
        """Run one receiver and one sender; (sender's JSON, receiver's JSON, stack CPU)."""
        assert self.stack is not None
        ns_side = bl.netns_exec(self.ns)
        source: list[str] = []
        if direction == "out":
            recv_at, send_at, port, dst = [], ns_side, self.out_port, GATEWAY
            recv_addr = "127.0.0.1"
        else:
            recv_at, send_at, port, dst = ns_side, [], self.in_port, "127.0.0.1"
            recv_addr = "0.0.0.0"
            source = [self.in_source]
        pin = bl.cpu_pin_prefix(bl.FRONTEND_CPU)
        window = [f"{warmup:g}", f"{seconds:g}", f"{START_TIMEOUT:g}"]
        flood = [str(self.flood), "send", dst, str(port), str(payload)]
        generators: list[bl.Proc] = []
        try:
            receiver = self._spawn(
                "udpflood receiver",
                [*recv_at, *pin, str(self.flood), "recv", recv_addr, str(port), *window],
            )
            generators.append(receiver)
            bl.wait_for_output(receiver, "ready", timeout=10.0)
            sender = self._spawn(
                "udpflood sender",
                [*send_at, *pin, *flood, f"{warmup + seconds + tail:g}", *source],
            )
            generators.append(sender)
            _sleep_until(sender.started + warmup + 0.1, self.watched)
            cpu0 = bl.cpu_seconds(self.stack.pid)
            _sleep_until(sender.started + warmup + seconds + 0.1, self.watched)
            cpu1 = bl.cpu_seconds(self.stack.pid)
            send_code = bl.wait_exit(sender, timeout=warmup + seconds + tail + 15.0)
            recv_code = bl.wait_exit(receiver, timeout=START_TIMEOUT + 15.0)
        finally:
            for proc in generators:
                bl.stop(proc, grace=2.0)
                self.procs.remove(proc)
        sent, got = _last_json(sender), _last_json(receiver)
        if sent is None or send_code != 0:
            raise bl.BenchError(f"sender failed (status {send_code}):\n{sender.tail()}")
        if got is None or recv_code != 0:
            raise bl.BenchError(f"receiver failed (status {recv_code}):\n{receiver.tail()}")
        cpu = None
        if cpu0 is not None and cpu1 is not None and cpu1[1] > cpu0[1]:
            cpu = (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1])
        return sent, got, cpu

    def measure(self, direction: str, payload: int, warmup: float, seconds: float) -> UdpRow:
        row = UdpRow(self.name, direction, payload, seconds)
        row.source = self.in_source if direction == "in" else ""
        row.busy_before = bl.cpu_busy_fraction(0.5, exclude=[p.pid for p in self.procs])
        tap0 = bl.link_drops(self.ns, GUEST_IF)
        fwd0 = _loopback_socket_drops(self.in_port) if direction == "in" else None
        try:
            sent, got, row.stack_cpu = self.exchange(
                direction, payload, warmup=warmup, seconds=seconds, tail=SEND_TAIL
            )
            if float(got["last_s"]) < seconds:
                raise bl.BenchError(
                    f"traffic stopped {float(got['last_s']):.2f} s into the {seconds:g} s "
                    f"window; {self.name} output:\n"
                    + (self.stack.tail() if self.stack is not None else "")
                )
            window = float(got["window_seconds"])
            row.rx_kpps = int(got["window_datagrams"]) / window / 1e3
            row.rx_mbps = int(got["window_bytes"]) * 8 / window / 1e6
            row.tx_kpps = int(sent["sent"]) / float(sent["seconds"]) / 1e3
            if int(sent["sent"]):
                row.loss_pct = max(0.0, 100.0 * (1 - int(got["received"]) / int(sent["sent"])))
            row.socket_drops = int(got["socket_drops"])
            if row.stack_cpu is not None and row.rx_kpps:
                row.stack_us = row.stack_cpu / row.rx_kpps * 1e3
            tap1 = bl.link_drops(self.ns, GUEST_IF)
            if tap0 is not None and tap1 is not None:
                row.tap_dropped = tap1 - tap0
            fwd1 = _loopback_socket_drops(self.in_port) if direction == "in" else None
            if fwd0 is not None and fwd1 is not None:
                row.fwd_dropped = fwd1 - fwd0
        except (bl.BenchError, KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
            row.error = str(exc)
        return row

    def cleanup(self) -> None:
        # generators, the stack, the namespace holder; each by pid.
        for proc in reversed(self.procs):
            bl.stop(proc, grace=8.0)
        if self.named:
            with contextlib.suppress(bl.BenchError):
                bl.run_cmd(["ip", "netns", "delete", self.ns], "delete namespace", 30.0)
            self.named = False
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None


# --------------------------------------------------------------------------- API


_SEQ = 0


def run_udp(
    workdir: Path,
    python: str,
    seconds: float,
    trionet_args: list[str],
    *,
    stacks: Sequence[str] = STACKS,
    directions: Sequence[str] = DIRECTIONS,
    payloads: Sequence[int] = PAYLOADS,
    warmup: float = 1.0,
    progress: bool = False,
) -> list[UdpRow]:
    """Measure every stack in every direction at every payload size (see the module
    docstring).  Each stack is set up once for all its figures.

    `python` runs trionet (with the repository on PYTHONPATH) and `trionet_args` are
    appended to its command line.  Returns one row per (stack, direction, payload),
    with the ratios filled in on trionet rows.  Failures are reported in
    ``UdpRow.error``; this raises only on bad arguments (ValueError).  Each figure takes
    about `warmup` + `seconds` + 2 s, each stack's setup a few seconds more; process
    logs go to `workdir`.
    """
    global _SEQ
    bad = [x for x in stacks if x not in STACKS] + [x for x in directions if x not in DIRECTIONS]
    if bad:
        raise ValueError(f"unknown {bad}; choose from {STACKS} and {DIRECTIONS}")
    if seconds <= 0 or warmup < 0 or not payloads or any(not 1 <= p <= 1472 for p in payloads):
        raise ValueError("seconds must be > 0, warmup >= 0, payloads within 1..1472")

    def say(text: str, end: str = "\n") -> None:
        if progress:
            print(text, end=end, file=sys.stderr, flush=True)

    rows: list[UdpRow] = []
    figures = [(d, p) for d in directions for p in payloads]
    in_source = _host_source_address()
    for name in (s for s in STACKS if s in stacks):
        _SEQ += 1
        stack: _Stack | None = None
        try:
            flood = bl.build_c_tool(UDPFLOOD_SRC, workdir)
            say(f"udp {name}: setting up ...", end=" ")
            stack = _Stack(
                name=name,
                workdir=workdir,
                flood=flood,
                seq=_SEQ,
                python=python,
                trionet_args=trionet_args,
                in_source=in_source,
            )
            stack.setup()
            say("ok")
            for direction, payload in figures:
                say(f"udp {name} {direction} {payload} B ...", end=" ")
                rows.append(stack.measure(direction, payload, warmup, seconds))
                say("FAILED" if rows[-1].error else f"{fmt(rows[-1].rx_kpps, '.1f')} kpps")
        except bl.BenchError as exc:
            say("FAILED")
            done = {(r.direction, r.payload) for r in rows if r.stack == name}
            rows += [UdpRow(name, *f, seconds, error=str(exc)) for f in figures if f not in done]
        finally:
            if stack is not None:
                stack.cleanup()
    _ratios(rows)
    return rows


def _ratios(rows: Sequence[UdpRow]) -> None:
    """Fill in vs_pasta and vs_slirp4netns on the trionet rows."""
    rx = {(r.stack, r.direction, r.payload): r.rx_kpps for r in rows}
    for r in rows:
        if r.stack == "trionet" and r.rx_kpps is not None:
            if base := rx.get(("pasta", r.direction, r.payload)):
                r.vs_pasta = r.rx_kpps / base
            if base := rx.get(("slirp4netns", r.direction, r.payload)):
                r.vs_slirp4netns = r.rx_kpps / base


def check_prereqs(stacks: Sequence[str] = STACKS) -> list[str]:
    """What is missing on this machine for run_udp (empty if nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (namespaces, taps, dropping privileges)")
    tools = ["ip", "taskset", "setpriv", "unshare"]
    tools += [s for s in ("pasta", "slirp4netns") if s in stacks]
    for tool in tools:
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found in PATH")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        problems.append("cc (a C compiler) not found in PATH")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun is missing")
    cpus = os.sched_getaffinity(0)
    if not {bl.BACKEND_CPU, bl.FRONTEND_CPU} <= cpus:
        problems.append(f"needs CPUs {bl.BACKEND_CPU} and {bl.FRONTEND_CPU}; have {sorted(cpus)}")
    return problems


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


# (header, width, UdpRow attribute, format) of the table's figure columns
_COLUMNS = (
    *(("rx_kpps", 8, "rx_kpps", ".1f"), ("rx_mbps", 8, "rx_mbps", ".1f")),
    *(("tx_kpps", 8, "tx_kpps", ".1f"), ("loss%", 5, "loss_pct", ".1f")),
    *(("stk_cpu", 7, "stack_cpu", ".2f"), ("us/dgram", 8, "stack_us", ".1f")),
    *(("tap_drop", 8, "tap_dropped", "d"), ("fwd_drop", 8, "fwd_dropped", "d")),
    *(("sock_drop", 9, "socket_drops", "d"), ("vs_pasta", 8, "vs_pasta", ".2f")),
    *(("vs_slirp", 8, "vs_slirp4netns", ".2f"), ("busy", 5, "busy_before", ".0%")),
)


def print_table(rows: Sequence[UdpRow]) -> None:
    hdr = f"{'stack':<11} {'dir':<3} {'payload':>7} "
    hdr += " ".join(f"{h:>{w}}" for h, w, _, _ in _COLUMNS)
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        lead = f"{r.stack:<11} {r.direction:<3} {r.payload:>7} "
        if r.error:
            print(lead + f"{'FAILED':>8}")
        else:
            print(lead + " ".join(f"{fmt(getattr(r, a), f):>{w}}" for _, w, a, f in _COLUMNS))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/benchudp.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=5.0, help="window per figure (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds (default 1)")
    p.add_argument("--stacks", default=",".join(STACKS), help="(default: all three)")
    p.add_argument("--directions", default=",".join(DIRECTIONS), help="(default: out,in)")
    p.add_argument("--payloads", default="64,1400", help="UDP payload bytes (default 64,1400)")
    p.add_argument("--trionet-args", default="", help="extra trionet arguments")
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    stacks = [x for x in args.stacks.split(",") if x]
    problems = check_prereqs(stacks)
    if problems:
        print("benchudp: " + "; ".join(problems), file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="trionet-benchudp-"))
    t0 = time.monotonic()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rows = run_udp(
            workdir,
            bl.venv_python(REPO),
            args.seconds,
            args.trionet_args.split(),
            stacks=stacks,
            directions=[x for x in args.directions.split(",") if x],
            payloads=[int(x) for x in args.payloads.split(",") if x],
            warmup=args.warmup,
            progress=True,
        )
    except ValueError as exc:
        print(f"benchudp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchudp: interrupted", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        bl.stop_all()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ngit revision: {bl.git_revision(REPO)}\n{describe(args.seconds, args.warmup)}\n")
    print_table(rows)
    print(f"\nwall time {time.monotonic() - t0:.0f} s")
    for r in rows:
        if r.error:
            print(f"\nFAILED {r.stack} {r.direction} {r.payload}: {r.error}", file=sys.stderr)
    return 1 if any(r.error for r in rows) else 0


def describe(seconds: float, warmup: float) -> str:
    """The legend printed above the table."""
    return (
        f"udp: datagrams/s through user-mode stacks on CPU {bl.BACKEND_CPU} (generators "
        f"on CPU {bl.FRONTEND_CPU}); out = guest to host, in = host "
        f"to guest; rx_kpps = received, {seconds:g} s window after {warmup:g} s; tx_kpps = "
        "offered; vs_* = trionet rx / that stack's rx (see tools/benchudp.py --help)"
    )


if __name__ == "__main__":
    sys.exit(main())
