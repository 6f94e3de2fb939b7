"""End to end, multiqueue: a 4-vCPU guest on 4 queue pairs served by trionet.

    guest eth0 (10.0.2.15, 4 pairs) --vhost-user--> trionet --tap tn0 (4 queues)--> netns

* ``ethtool -L`` 4 -> 1 -> 2 -> 4 under a 4-stream iperf3 upload: trionet applies
  each count, inactive pairs carry nothing, the stream never stalls;
* ``rmmod``/``insmod virtio_net`` and a virtio-pci unbind/bind (the device reset a
  reboot does; the harness runs QEMU with -no-reboot): the count drops to 1 on the
  reset and comes back to the guest's choice;
* trionet restarted under a running guest (QEMU reconnect=1, ``--state-file``):
  traffic resumes on its own with the 4 pairs restored.

The vhost-user requests QEMU sent in each scenario are read back from trionet's
debug log, compressed, and written to build/e2e/qemu-sequences.txt.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.guest import (
    REPO,
    Guest,
    GuestError,
    boot_guest,
    ensure_guest_image,
    prerequisite_problems,
)
from tests.e2e.hostnet import Trionet, network_namespace, sh, trionet_service, wait_for_link
from trionet.service.server import read_status

pytestmark = [pytest.mark.e2e, pytest.mark.root]

HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
TAP = "tn0"
PAIRS = 4
SEQUENCES = REPO / "build" / "e2e" / "qemu-sequences.txt"
SETTLE = 1.0  # after a count change, before a phase's counters are read
PHASE = 5.0  # seconds of traffic measured per ethtool -L phase
IPERF_SECONDS = 24
TEST_TIMEOUT = 150  # a hang fails the test instead of blocking the run

Status = dict[str, Any]


def require_prerequisites() -> None:
    problems = prerequisite_problems()
    if problems:
        pytest.fail("e2e prerequisites missing: " + "; ".join(problems))


# ---- trionet status ---------------------------------------------------------------


async def status(ctl: Path) -> Status:
    return await trio.to_thread.run_sync(read_status, ctl)


async def wait_status(ctl: Path, ok: Callable[[Status], bool], what: str, timeout: float) -> Status:
    """Poll the control socket until ``ok(status)``; fail with the last status."""
    last: Status | str = "no answer"
    with trio.move_on_after(timeout):
        while True:
            try:
                last = await status(ctl)
            except OSError as exc:  # a restarting trionet has no control socket yet
                last = f"control socket: {exc}"
            else:
                if ok(last):
                    return last
            await trio.sleep(0.2)
    raise AssertionError(f"trionet status: {what} not reached in {timeout} s; last: {last}")


def pair_counters(st: Status) -> list[tuple[int, int]]:
    """(tx_packets, rx_packets) per pair: tx is guest -> host, rx host -> guest."""
    return [(p["tx_packets"], p["rx_packets"]) for p in sorted(st["pairs"], key=_index)]


def _index(p: dict[str, Any]) -> int:
    return int(p["index"])


def active_is(n: int) -> Callable[[Status], bool]:
    return lambda st: bool(st.get("connected", True)) and st["active_pairs"] == n


# ---- host side ----------------------------------------------------------------------


async def configure_tap(ns: str) -> None:
    await wait_for_link(ns, TAP)
    await sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP, netns=ns)
    await sh("ip", "link", "set", TAP, "up", netns=ns)


def trionet_args(ctl: Path, state: Path | None = None) -> list[str]:
    args = ["--control-socket", str(ctl), "--log-level", "debug"]
    if state is not None:
        args += ["--state-file", str(state)]
    return args


@asynccontextmanager
async def iperf3_server(ns: str) -> AsyncIterator[trio.Process]:
    """``iperf3 -s`` inside ``ns``, killed by pid on exit."""
    argv = ["ip", "netns", "exec", ns, "iperf3", "-s", "-B", HOST_IP]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(10):
            while not await _listening(ns):
                if proc.poll() is not None:
                    raise GuestError(f"iperf3 -s exited with status {proc.returncode}")
                await trio.sleep(0.1)
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()


async def _listening(ns: str) -> bool:
    out = await sh("ss", "-Htln", "sport", "= :5201", netns=ns)
    return bool(out.strip())


# ---- guest side ---------------------------------------------------------------------


async def configure_guest(guest: Guest) -> None:
    await guest.check(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up")


async def wait_eth0(guest: Guest) -> None:
    """Wait (20 s at most) until the driver has registered eth0 again."""
    await guest.check(
        "i=0; while [ ! -e /sys/class/net/eth0 ]; do"
        " sleep 0.2; i=$((i+1)); [ $i -lt 100 ] || exit 1; done"
    )


async def ping_ok(guest: Guest, count: int = 3) -> str:
    status_, out = await guest.run(f"ping -c {count} -W 5 {HOST_IP}", timeout=90)
    assert status_ == 0 and f"{count} packets received" in out, out
    return out


def combined_current(ethtool_l: str) -> int:
    """``Combined:`` under "Current hardware settings" of ``ethtool -l``."""
    current = ethtool_l.split("Current hardware settings", 1)[1]
    m = re.search(r"Combined:\s*(\d+)", current)
    assert m, ethtool_l
    return int(m.group(1))


# ---- the vhost-user messages QEMU sent, from trionet's debug log ----------------------

REQUEST_RE = re.compile(r" request (\w+)\((.*)\)\s*$")
ACTIVE_RE = re.compile(r" active queue pairs (\d+) -> (\d+) \((.*)\); ")
EVENT_RE = re.compile(r" (VMM connected|VMM closed the connection|session ended)")


@dataclass(frozen=True)
class Token:
    name: str  # SET_VRING_ENABLE, or "=>" for a change of the active pair count
    index: int | None = None
    value: str = ""


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def _field(args: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=([^,()]+)", args)
    return m.group(1).strip() if m else None


def parse_log(text: str) -> list[Token]:
    tokens = []
    for line in text.splitlines():
        if m := REQUEST_RE.search(line):
            name, args = _snake(m.group(1)), m.group(2)
            index = _field(args, "index")
            value = ""
            if name == "SET_VRING_ENABLE":
                value = "1" if _field(args, "enable") == "True" else "0"
            elif name in ("SET_VRING_NUM", "SET_VRING_BASE"):
                value = _field(args, "num") or ""
            elif name in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
                value = "nofd" if _field(args, "fd") == "None" else "fd"
            elif name in ("SET_FEATURES", "SET_PROTOCOL_FEATURES", "SET_STATUS"):
                key = "status" if name == "SET_STATUS" else "features"
                value = hex(int(_field(args, key) or 0))
            elif name == "NET_SET_MTU":
                value = _field(args, "mtu") or ""
            elif name == "SET_MEM_TABLE":
                value = f"{args.count('MemRegion(')} region(s)"
            tokens.append(Token(name, int(index) if index is not None else None, value))
        elif m := ACTIVE_RE.search(line):
            tokens.append(Token("=>", None, f"active pairs {m.group(1)} -> {m.group(2)} ({m[3]})"))
        elif m := EVENT_RE.search(line):
            tokens.append(Token("--", None, m.group(1)))
    return tokens


def _ranges(indices: Iterable[int]) -> str:
    out: list[str] = []
    run: list[int] = []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}")
    return ",".join(out)


def _values(pairs: list[tuple[int, str]]) -> str:
    """``[(0,'1'),(1,'1'),(2,'0')]`` -> ``0..1=1, 2=0`` (runs of equal values)."""
    parts: list[str] = []
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][1] == pairs[i][1]:
            j += 1
        idx = _ranges(p[0] for p in pairs[i : j + 1])
        parts.append(f"{idx}={pairs[i][1]}" if pairs[i][1] else idx)
        i = j + 1
    return ", ".join(parts)


def _block(tokens: list[Token], i: int, k: int) -> int:
    """How many times a k-message per-vring block starting at ``i`` repeats."""
    head = tokens[i : i + k]
    if len(head) < k or any(t.index is None or t.index != head[0].index for t in head):
        return 0
    names = [t.name for t in head]
    reps = 1
    while True:
        nxt = tokens[i + reps * k : i + (reps + 1) * k]
        if len(nxt) < k or [t.name for t in nxt] != names:
            break
        if any(t.index is None or t.index != nxt[0].index for t in nxt):
            break
        reps += 1
    return reps


def summarize(tokens: list[Token]) -> list[str]:
    """One line per run: a request type over several vrings, or a per-vring block."""
    lines: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.index is None:
            j = i
            while j + 1 < len(tokens) and tokens[j + 1] == t and t.name not in ("=>", "--"):
                j += 1
            times = f" x{j - i + 1}" if j > i else ""
            if t.name in ("=>", "--"):
                lines.append(f"  {t.name} {t.value}")
            else:
                lines.append(f"{t.name}{' ' + t.value if t.value else ''}{times}")
            i = j + 1
            continue
        best_k, best_reps = 1, 1
        for k in range(1, 7):
            reps = _block(tokens, i, k)
            if reps >= 2 and k * reps > best_k * best_reps:
                best_k, best_reps = k, reps
        if best_k == 1:
            j = i
            while (
                j + 1 < len(tokens)
                and tokens[j + 1].name == t.name
                and (tokens[j + 1].index or 0) > (tokens[j].index or 0)
            ):
                j += 1
            run = tokens[i : j + 1]
            lines.append(f"{t.name} {_values([(x.index or 0, x.value) for x in run])}")
            i = j + 1
            continue
        blocks = [tokens[i + b * best_k : i + (b + 1) * best_k] for b in range(best_reps)]
        parts = []
        for pos in range(best_k):
            col = [(blk[pos].index or 0, blk[pos].value) for blk in blocks]
            vals = {v for _, v in col}
            if len(vals) == 1:
                v = vals.pop()
                parts.append(f"{blocks[0][pos].name}{'=' + v if v else ''}")
            else:
                parts.append(f"{blocks[0][pos].name}({_values(col)})")
        idx = _ranges(blk[0].index or 0 for blk in blocks)
        lines.append(f"vrings {idx}, each: " + ", ".join(parts))
        i += best_k * best_reps
    return _repeats(lines)


def _repeats(lines: list[str]) -> list[str]:
    """Identical consecutive lines once, with a count."""
    out: list[tuple[str, int]] = []
    for line in lines:
        if out and out[-1][0] == line:
            out[-1] = (line, out[-1][1] + 1)
        else:
            out.append((line, 1))
    return [line if n == 1 else f"{line}  (x{n})" for line, n in out]


class LogMarks:
    """Cut trionet's log into scenarios by byte offsets."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.pos = 0
        self.sections: list[tuple[str, list[str]]] = []

    def cut(self, scenario: str) -> list[str]:
        data = self.log.read_bytes()
        text = data[self.pos :].decode(errors="replace")
        self.pos = len(data)
        lines = summarize(parse_log(text))
        self.sections.append((scenario, lines))
        return lines


def write_sequences(test: str, sections: list[tuple[str, list[str]]]) -> None:
    """Replace this test's part of build/e2e/qemu-sequences.txt (other tests' stay)."""
    SEQUENCES.parent.mkdir(parents=True, exist_ok=True)
    parts: dict[str, str] = {}
    if SEQUENCES.exists():
        for chunk in SEQUENCES.read_text().split("\n#### ")[1:]:
            name, _, kept = chunk.partition("\n")
            parts[name.strip()] = kept.strip("\n")
    body: list[str] = []
    for scenario, lines in sections:
        body.append(f"== {scenario} ==")
        body += [f"  {line}" for line in lines] or ["  (none)"]
    parts[test] = "\n".join(body)
    head = (
        "vhost-user requests QEMU 7.2 sent to trionet (4 queue pairs: vrings 0..7,\n"
        "rx = even, tx = odd), read from trionet's debug log; '=>' lines are trionet's\n"
        "changes of the active pair count. Written by tests/e2e/test_guest_multiqueue.py.\n"
    )
    text = head + "".join(f"\n#### {name}\n{parts[name]}\n" for name in sorted(parts))
    SEQUENCES.write_text(text)
    print(text)


def print_log_tail(service: Trionet | None) -> None:
    if service is not None:
        lines = service.stderr().splitlines()
        print(f"--- trionet (pid {service.pid}, status {service.returncode}) log tail ---")
        print("\n".join(line for line in lines[-60:]))


# ---- 1: ethtool -L under a TCP stream ---------------------------------------------------


@dataclass
class PhaseResult:
    combined: int
    label: str
    deltas: list[tuple[int, int]] = field(default_factory=list)  # (tx, rx) per pair
    active: tuple[int, int] = (0, 0)  # active_pairs at the start and end of the phase

    def describe(self) -> str:
        cells = "  ".join(f"p{p}: tx+{tx} rx+{rx}" for p, (tx, rx) in enumerate(self.deltas))
        return f"{self.label} (active {self.active}): {cells}"


async def start_cpu_probes(guest: Guest) -> None:
    """One ping per second from each vCPU (pinned), for the whole test.

    The guest picks a TX queue by the sending CPU (XPS, which virtio_net sets up for
    every channel count), not by flow: a single-threaded ``iperf3 -P 4`` puts all its
    streams on the queue of the one vCPU it runs on. The probes make every active
    queue carry something, whatever vCPU iperf3 is on."""
    for cpu in range(PAIRS):
        await guest.check(f"taskset {1 << cpu:x} ping -q {HOST_IP} >/dev/null 2>&1 &")


async def measure(ctl: Path, combined: int, label: str, seconds: float) -> PhaseResult:
    await trio.sleep(SETTLE)
    a = await status(ctl)
    await trio.sleep(seconds)
    b = await status(ctl)
    deltas = [
        (tb - ta, rb - ra)
        for (ta, ra), (tb, rb) in zip(pair_counters(a), pair_counters(b), strict=True)
    ]
    return PhaseResult(combined, label, deltas, (a["active_pairs"], b["active_pairs"]))


SUM_RE = re.compile(
    r"\[SUM\]\s+([\d.]+)-([\d.]+)\s+sec\s+([\d.]+)\s+(\w?Bytes)\s+([\d.]+)\s+(\w?bits/sec)(.*)"
)


def iperf_sums(out: str) -> tuple[list[tuple[float, float, float]], list[str]]:
    """(start, end, bits/s) of each 1 s SUM interval, and the final SUM lines."""
    scale = {"bits/sec": 1.0, "Kbits/sec": 1e3, "Mbits/sec": 1e6, "Gbits/sec": 1e9}
    intervals, totals = [], []
    for m in SUM_RE.finditer(out):
        start, end, rate = float(m.group(1)), float(m.group(2)), float(m.group(5))
        if "sender" in m.group(7) or "receiver" in m.group(7):
            totals.append(m.group(0).strip())
        else:
            intervals.append((start, end, rate * scale[m.group(6)]))
    return intervals, totals


async def test_ethtool_channels_under_tcp_stream(tmp_path: Path) -> None:
    require_prerequisites()
    await trio.to_thread.run_sync(ensure_guest_image)
    service: Trionet | None = None
    ctl = tmp_path / "control.sock"
    sock = tmp_path / "vhost.sock"
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with (
                network_namespace("tnmq-") as ns,
                trionet_service(
                    netns=ns,
                    socket_path=sock,
                    tap=TAP,
                    queue_pairs=PAIRS,
                    log_path=tmp_path / "trionet.log",
                    extra_args=trionet_args(ctl),
                ) as service,
            ):
                marks = LogMarks(service.log_path)
                await configure_tap(ns)
                async with (
                    iperf3_server(ns),
                    boot_guest(
                        netdev_args=None,
                        vhost_user_socket=str(sock),
                        queue_pairs=PAIRS,
                        smp=PAIRS,
                        log_path=tmp_path / "console.log",
                    ) as guest,
                ):
                    print(f"guest booted in {guest.boot_seconds:.1f} s")
                    await configure_guest(guest)
                    assert combined_current(await guest.check("ethtool -l eth0")) == PAIRS
                    await wait_status(ctl, active_is(PAIRS), "4 active pairs at boot", 20)
                    await ping_ok(guest)
                    marks.cut("boot (driver load, 4 vCPUs)")

                    await guest.check(
                        f"iperf3 -c {HOST_IP} -P 4 -t {IPERF_SECONDS} -i 1 >/tmp/ip.out 2>&1 &"
                    )
                    await start_cpu_probes(guest)
                    phases = [
                        await measure(ctl, PAIRS, "warm-up, 4 pairs", 2.0)
                    ]  # warm-up at 4 pairs
                    for combined in (1, 2, 4):
                        await guest.check(f"ethtool -L eth0 combined {combined}", timeout=60)
                        await wait_status(ctl, active_is(combined), f"{combined} active pairs", 20)
                        phases.append(await measure(ctl, combined, f"combined {combined}", PHASE))
                        updown = "down" if combined == 1 else "up"
                        marks.cut(f"ethtool -L eth0 combined {combined} ({updown})")
                    for ph in phases:
                        print(ph.describe())

                    with trio.fail_after(60):
                        while True:
                            st, _ = await guest.run("pidof iperf3")
                            if st != 0:
                                break
                            await trio.sleep(1)
                    await guest.run("kill $(pidof ping)")
                    out = await guest.check("cat /tmp/ip.out")
                    print(out)
                    assert combined_current(await guest.check("ethtool -l eth0")) == PAIRS
                write_sequences("ethtool -L under iperf3", marks.sections)
                print("per-pair packet deltas per phase (tx = guest->host, rx = host->guest):")
                for ph in phases:
                    print("  " + ph.describe())

                for ph in phases:
                    assert ph.active == (ph.combined, ph.combined), ph.describe()
                    moved = [p for p, (tx, rx) in enumerate(ph.deltas) if tx or rx]
                    assert 0 in moved, f"pair 0 moved nothing: {ph.describe()}"
                    inactive = [p for p in moved if p >= ph.combined]
                    assert not inactive, f"inactive pairs {inactive} moved: {ph.describe()}"
                    # every vCPU has a probe, and XPS maps each active queue to a vCPU
                    idle = [p for p in range(ph.combined) if p not in moved]
                    assert not idle, f"active pairs {idle} moved nothing: {ph.describe()}"

                intervals, totals = iperf_sums(out)
                assert len(intervals) >= IPERF_SECONDS - 1, out
                rates = [iv[2] / 1e6 for iv in intervals]
                print(f"iperf3 SUM per interval: min {min(rates):.0f} Mbit/s, max {max(rates):.0f}")
                stalled = [iv for iv in intervals if iv[2] <= 0]
                assert not stalled, f"iperf3 stalled in {stalled}:\n{out}"
                assert totals and all(" 0.00 bits/sec" not in t for t in totals), out
                assert service.returncode is None, "trionet exited while serving the guest"
    finally:
        print_log_tail(service)


# ---- 2: driver unload / reload, device reset ------------------------------------------


async def test_driver_unload_reload_and_reset(tmp_path: Path) -> None:
    require_prerequisites()
    await trio.to_thread.run_sync(ensure_guest_image)
    service: Trionet | None = None
    ctl = tmp_path / "control.sock"
    sock = tmp_path / "vhost.sock"
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with (
                network_namespace("tnmq-") as ns,
                trionet_service(
                    netns=ns,
                    socket_path=sock,
                    tap=TAP,
                    queue_pairs=PAIRS,
                    log_path=tmp_path / "trionet.log",
                    extra_args=trionet_args(ctl),
                ) as service,
            ):
                marks = LogMarks(service.log_path)
                await configure_tap(ns)
                async with boot_guest(
                    netdev_args=None,
                    vhost_user_socket=str(sock),
                    queue_pairs=PAIRS,
                    smp=PAIRS,
                    log_path=tmp_path / "console.log",
                ) as guest:
                    print(f"guest booted in {guest.boot_seconds:.1f} s")
                    await configure_guest(guest)
                    await wait_status(ctl, active_is(PAIRS), "4 active pairs at boot", 20)
                    await ping_ok(guest)
                    marks.cut("boot (driver load, 4 vCPUs)")
                    pci = (
                        await guest.check(
                            "basename $(dirname $(readlink -f /sys/class/net/eth0/device))"
                        )
                    ).strip()

                    await guest.check("rmmod virtio_net")
                    st = await wait_status(ctl, active_is(1), "1 active pair after rmmod", 20)
                    marks.cut("rmmod virtio_net (unload)")
                    print("after unload:", st["active_changes"][-3:])
                    last = st["active_changes"][-1]
                    assert last["count"] == 1 and "reset" in last["cause"], st["active_changes"]

                    await guest.check("insmod /lib/modules/virtio_net.ko")
                    await wait_eth0(guest)
                    assert combined_current(await guest.check("ethtool -l eth0")) == PAIRS
                    st = await wait_status(ctl, active_is(PAIRS), "4 pairs after insmod", 20)
                    await configure_guest(guest)
                    await ping_ok(guest)
                    marks.cut("insmod virtio_net (reload)")
                    print("after reload:", st["active_changes"][-3:])

                    # What a reboot does to the device: virtio-pci resets it on unbind, and
                    # the driver negotiates from scratch on bind.
                    drv = "/sys/bus/pci/drivers/virtio-pci"
                    await guest.check(f"echo {pci} > {drv}/unbind")
                    st = await wait_status(ctl, active_is(1), "1 active pair after unbind", 20)
                    last = st["active_changes"][-1]
                    assert last["count"] == 1 and "reset" in last["cause"], st["active_changes"]
                    marks.cut(f"virtio-pci unbind {pci} (device reset)")
                    await guest.check(f"echo {pci} > {drv}/bind")
                    await wait_eth0(guest)
                    st = await wait_status(ctl, active_is(PAIRS), "4 pairs after bind", 20)
                    await configure_guest(guest)
                    await ping_ok(guest)
                    marks.cut(f"virtio-pci bind {pci} (driver probes again)")
                    print("after rebind:", st["active_changes"][-4:])
                write_sequences("driver unload/reload, device reset", marks.sections)
                assert service.returncode is None, "trionet exited while serving the guest"
    finally:
        print_log_tail(service)


# ---- 3: trionet restart, QEMU reconnects ------------------------------------------------


async def restart_scenario(tmp_path: Path) -> list[dict[str, Any]]:
    """Boot on 4 pairs, restart trionet under the guest; the new trionet's
    ``active_changes`` once traffic flows again."""
    require_prerequisites()
    await trio.to_thread.run_sync(ensure_guest_image)
    ctl = tmp_path / "control.sock"
    sock = tmp_path / "vhost.sock"
    state = tmp_path / "state.json"
    first: Trionet | None = None
    second: Trionet | None = None
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with network_namespace("tnmq-") as ns:
                # The tap outlives trionet (its owner is the orchestrator, not trionet),
                # so its address survives the restart.
                await sh(
                    "ip",
                    "tuntap",
                    "add",
                    "dev",
                    TAP,
                    "mode",
                    "tap",
                    "multi_queue",
                    "vnet_hdr",
                    netns=ns,
                )
                await configure_tap(ns)
                async with (
                    trionet_service(
                        netns=ns,
                        socket_path=sock,
                        tap=TAP,
                        queue_pairs=PAIRS,
                        log_path=tmp_path / "trionet-1.log",
                        extra_args=trionet_args(ctl, state),
                    ) as first,
                    boot_guest(
                        netdev_args=None,
                        vhost_user_socket=str(sock),
                        queue_pairs=PAIRS,
                        smp=PAIRS,
                        reconnect=True,
                        log_path=tmp_path / "console.log",
                    ) as guest,
                ):
                    print(f"guest booted in {guest.boot_seconds:.1f} s")
                    await configure_guest(guest)
                    assert combined_current(await guest.check("ethtool -l eth0")) == PAIRS
                    await wait_status(ctl, active_is(PAIRS), "4 active pairs at boot", 20)
                    await ping_ok(guest)
                    marks1 = LogMarks(first.log_path)
                    marks1.cut("boot (driver load, 4 vCPUs)")

                    # SIGTERM to the first trionet, by pid, and wait for it
                    first.proc.terminate()
                    with trio.fail_after(15):
                        await first.proc.wait()
                    print(f"trionet pid {first.pid} exited with {first.returncode}")
                    marks1.cut("trionet stopped (SIGTERM)")
                    t0 = trio.current_time()
                    async with trionet_service(
                        netns=ns,
                        socket_path=sock,
                        tap=TAP,
                        queue_pairs=PAIRS,
                        log_path=tmp_path / "trionet-2.log",
                        extra_args=trionet_args(ctl, state),
                    ) as second:
                        st = await wait_status(
                            ctl, active_is(PAIRS), "4 pairs restored after reconnect", 30
                        )
                        print(
                            f"reconnected, 4 pairs, {trio.current_time() - t0:.1f} s after restart"
                        )
                        print("active changes:", st["active_changes"])
                        await ping_ok(guest)
                        print(f"ping ok {trio.current_time() - t0:.1f} s after restart")
                        marks2 = LogMarks(second.log_path)
                        marks2.cut("reconnect (new trionet, same socket, state file, tap)")
                        saved = json.loads(state.read_text())
                        print("state file:", saved)
                        assert saved["active_pairs"] == PAIRS, saved
                        st = await status(ctl)
                        assert st["active_pairs"] == PAIRS
                        assert st["faults"]["restored"] >= 1, st["faults"]  # counted
                        assert "restart, restoring 4 active pairs" in second.stderr()
                        assert second.returncode is None
                        changes: list[dict[str, Any]] = st["active_changes"]
                write_sequences("restart with reconnect", marks1.sections + marks2.sections)
                return changes
    finally:
        print_log_tail(first)
        print_log_tail(second)


async def test_restart_reconnect_restores_pairs(tmp_path: Path) -> None:
    await restart_scenario(tmp_path)


async def test_restart_keeps_restored_count_during_reconnect(tmp_path: Path) -> None:
    changes = await restart_scenario(tmp_path)
    restored = [i for i, c in enumerate(changes) if c["cause"] == "driver negotiated features"]
    assert restored and changes[restored[0]]["count"] == PAIRS, changes
    after = changes[restored[0] :]
    assert all(c["count"] == PAIRS for c in after), f"restored count not kept: {after}"
