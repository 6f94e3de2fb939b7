"""End to end: live migration of a guest on trionet's user backend (and the
same on the tap backend, ``test_live_migration_on_tap_backend``).

    source QEMU  --vhost-user--> trionet A (user, -u 127.0.0.1/PORT_A:5000) --.
        | migrate (QMP, over a UNIX socket)                                    +-- host loopback
    dest. QEMU   --vhost-user--> trionet B (user, -u 127.0.0.1/PORT_B:5000) --'

A 2-vCPU guest on 2 queue pairs takes its lease from trionet A, then, while

(a) it pings the gateway every 0.2 s (trionet's ICMP echo sockets), and
(b) the host streams numbered 1000-byte UDP datagrams into it at RATE/s through
    A's inbound forward (switching to B's once the migration completed), each
    datagram's content a function of its number, appended to a file by socat,

the source QEMU migrates it to a destination QEMU (``-incoming``) with trionet B.
Trionet A marks every guest page it writes in QEMU's dirty log (LOG_ALL), so RX
buffers it filled during the migration reach the destination: the guest then checks
every datagram it kept against its number (a page copied before trionet wrote it and
not marked would hold an older datagram or garbage: a mismatch or a repeated number).
The test measures QEMU's downtime, lost pings and lost datagrams, and checks trionet B
serves both pairs (the pair count travels in QEMU's virtio-net state and reaches B as
SET_VRING_ENABLE).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.guest import (
    Guest,
    GuestError,
    accel_args,
    ensure_guest_image,
    prerequisite_problems,
    qemu_argv,
    tail_lines,
)
from tests.e2e.hostnet import (
    Trionet,
    network_namespace,
    ping_group_range,
    sh,
    trionet_service,
    user_ids,
    user_runtime_dir,
    user_trionet_service,
    wait_for_link,
)
from tests.e2e.loopback import dns_server
from tests.e2e.ports import free_ports
from tests.e2e.qmp import QMP
from tests.e2e.test_guest_user import status, wait_status
from tests.e2e.usernet import GATEWAY_V4, dhcp_lease, user_backend_args

pytestmark = [pytest.mark.e2e, pytest.mark.root]

USER = "nobody"
PAIRS = 2
MAC = "52:54:00:12:34:56"
MEM_MB = 256
GUEST_PORT = 5000
RATE = 100  # datagrams per second from the host
LINE = 1000  # bytes per datagram: "%08d " + 99 chunks of 10 + "\n"
STREAM_BEFORE = 3.0  # seconds of streaming before the migration starts
STREAM_AFTER = 5.0  # and after it completed
MAX_LOST_PINGS = 5
# tsc=reliable: a TCG guest that finds its TSC jumped after the switch marks it
# unstable and patches its sched_clock code while other vCPUs run it; QEMU 7.2's
# multi-threaded TCG can then execute a half-patched page (the guest dies in
# sched_clock_cpu). loglevel=5: warnings reach the console (the harness's "quiet"
# hides them).
GUEST_APPEND = "tsc=reliable loglevel=5"
TEST_TIMEOUT = 900
# A guest kernel that crashes or hangs after the switch, or a source that never
# finishes booting, is QEMU 7.2's TCG here, not trionet: the same per-CPU list
# and slab corruption, and the same silent hang, happen on the destination with
# QEMU's own virtio-net on slirp, without trionet (docs/migration.md). Under TCG
# such an attempt is made again, up to TCG_ATTEMPTS times in all; under KVM,
# never.
TCG_ATTEMPTS = 3
CONSOLE_PROBE = 20  # seconds a guest that runs has to answer ``true`` on its console
KERNEL_CRASH = re.compile(
    r"Kernel panic|BUG: |Oops: |general protection fault|list_(?:add|del) corruption"
)
CLONE_NEWNET = 0x40000000


def datagram(seq: int) -> bytes:
    """Datagram ``seq``: its number and 99 chunks computed from it (the guest's awk
    recomputes them, so any byte changed, or an older datagram in its place, shows)."""
    body = "".join(f"{(seq * 7919 + k * 104729) % 1000000000:09d}," for k in range(99))
    return f"{seq:08d} {body}\n".encode()


# Run by the guest's busybox awk over the file socat appended the datagrams to.
# The number's leading zeros are stripped before it becomes a number: busybox awk
# (with its DESKTOP option, as Debian builds it) reads a string such as "00000123"
# as octal (83), so every number written only with the digits 0-7 would be
# recomputed wrongly and counted bad. The first bad lines are printed (line
# number, length, start) to show what a mismatch looks like, and the first 20
# numbers missing between the lowest and the highest (where datagrams were lost).
# Each attempt numbers its datagrams from its own BASE: intact datagrams below it
# are an earlier attempt's, which the tap queued while that attempt's hung guest
# took none, and which the tap backend hands to the next VMM session's guest;
# they are counted as stale, apart from the attempt's own.
AWK_CHECK = (
    'awk \'{ seq = substr($0, 1, 8); sub(/^0+/, "", seq); seq += 0;'
    ' want = sprintf("%08d ", seq);'
    " for (k = 0; k < 99; k++)"
    ' want = want sprintf("%09d,", (seq * 7919 + k * 104729) % 1000000000);'
    " if ($0 == want && length($0) == 999 && seq < BASE) stale++;"
    " else if ($0 == want && length($0) == 999) { good++; if (seen[seq]++) dup++;"
    ' if (min == "" || seq < min) min = seq; if (seq > max) max = seq;'
    " if (seq >= FROM) after++ } else if (++bad <= 3)"
    ' printf "bad line %d: length %d: %s\\n", NR, length($0), substr($0, 1, 40) }'
    ' END { printf "good=%d bad=%d dup=%d after=%d min=%d max=%d stale=%d\\n",'
    " good, bad, dup, after, min, max, stale; gap = 0;"
    " for (s = min; s <= max && gap < 20; s++) if (!(s in seen)) lost[gap++] = s;"
    ' if (gap) { printf "missing:"; for (i = 0; i < gap; i++) printf " %d", lost[i];'
    ' print "" } }\' FROM=%d BASE=%d /tmp/rx'
)
ATTEMPT_BASE = 1_000_000  # attempt n numbers its datagrams from (n - 1) * this


def awk_check(switched_at: int, base: int = 0, path: str = "/tmp/rx") -> str:
    """The guest's check for a stream numbered from ``base`` that switched to the
    destination after ``switched_at`` datagrams."""
    cmd = AWK_CHECK.replace("FROM=%d", f"FROM={base + switched_at}")
    return cmd.replace("BASE=%d", f"BASE={base}").replace("/tmp/rx", path)


@dataclass
class Stream:
    """The host's numbered datagrams into the guest, from ``sock`` to ``dest``
    (the user backend: the source's inbound forward, then the destination's)."""

    sock: socket.socket
    dest: tuple[str, int]
    base: int = 0  # the first datagram's number
    sent: int = 0
    switched_at: int | None = None  # datagrams sent before the switch

    def switch(self, dest: tuple[str, int]) -> None:
        self.switched_at = self.sent
        self.dest = dest

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.from_stdlib_socket(self.sock) as sock:
            task_status.started()
            start = trio.current_time()
            while True:
                await sock.sendto(datagram(self.base + self.sent), self.dest)
                self.sent += 1
                await trio.sleep_until(start + self.sent / RATE)


@dataclass
class Setup:
    """What the migration needs from a backend's rig."""

    name: str
    svc: dict[str, Trionet]  # "a": the source's trionet, "b": the destination's
    sock: dict[str, Path]  # their vhost-user sockets
    ctl: dict[str, Path]  # their control sockets
    ping_target: str
    stream_dest: dict[str, tuple[str, int]]  # where the host sends, before and after
    stream_socket: Callable[[], socket.socket]
    configure: Callable[[Guest], Awaitable[None]]  # addresses on the source guest


def netns_socket(netns: str) -> socket.socket:
    """A UDP socket in network namespace ``netns`` (made by a short-lived thread
    that enters it, so this process stays where it is)."""
    made: list[socket.socket] = []

    def enter_and_make() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}")
        finally:
            os.close(fd)
        made.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))

    t = threading.Thread(target=enter_and_make)
    t.start()
    t.join()
    if not made:
        raise OSError(f"no socket made in {netns}")
    return made[0]


@asynccontextmanager
async def qemu(argv: Sequence[str], log_path: Path) -> AsyncIterator[Guest]:
    """QEMU with its serial console on stdio (the harness's Guest), not waiting for
    a boot; SIGKILL to its pid on exit."""
    log_file = log_path.open("w", encoding="utf-8")
    log_file.write("# " + " ".join(argv) + "\n")
    proc = await trio.lowlevel.open_process(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    guest = Guest(proc, log_file)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest._pump_console)
            nursery.start_soon(guest._pump_stderr)
            nursery.start_soon(guest._watch_exit)
            try:
                yield guest
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.stdin is not None:
                await proc.stdin.aclose()
        log_file.write(f"\n# QEMU exit status {proc.returncode}\n# --- stderr ---\n")
        log_file.write(guest.stderr)
        log_file.close()


def vm_argv(
    sock: Path | None, qmp: Path, extra: Sequence[str] = (), netdev: Sequence[str] = ()
) -> list[str]:
    """The guest's QEMU on vhost-user at ``sock``; or, without one, on ``netdev``
    (QEMU's own back ends, one queue pair: tools/migration_baseline.py)."""
    argv = qemu_argv(
        netdev_args=list(netdev) if sock is None else None,
        vhost_user_socket=None if sock is None else str(sock),
        queue_pairs=1 if sock is None else PAIRS,
        mac=MAC,
        smp=PAIRS,
        mem_mb=MEM_MB,
        reconnect=False,
        extra_append=GUEST_APPEND,
    )
    return [*argv, "-qmp", f"unix:{qmp},server=on,wait=off", *extra]


async def migrate(src: QMP, uri: str, timeout: float = 300) -> dict[str, Any]:
    """Migrate the source VM to ``uri``; return query-migrate's final answer."""
    await src.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 30, "downtime-limit": 300})
    await src.execute("migrate", uri=uri)
    with trio.fail_after(timeout):
        while True:
            info: dict[str, Any] = await src.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            await trio.sleep(0.1)


def ping_counts(out: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    if not m:
        raise AssertionError(f"no ping statistics in {out!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass
class Figures:
    """What the run measured (printed, and written next to the logs)."""

    downtime_ms: int | None = None
    total_ms: int | None = None
    pings_sent: int = 0
    pings_lost: int = 0
    datagrams_sent: int = 0
    datagrams_good: int = 0
    datagrams_bad: int = 0
    datagrams_repeated: int = 0
    datagrams_after_switch_sent: int = 0
    datagrams_after_switch_good: int = 0
    datagrams_missing: list[int] = field(default_factory=list)  # the first 20 numbers
    datagrams_stale: int = 0  # an earlier attempt's, queued by a tap meanwhile

    @property
    def datagrams_lost(self) -> int:
        return self.datagrams_sent - self.datagrams_good


def tails(service: Trionet, guest: Guest, name: str) -> str:
    return (
        f"--- trionet {name} log tail ---\n{tail_lines(service.stderr(), 40)}\n"
        f"--- QEMU {name} console tail ---\n{tail_lines(guest.console, 20)}\n"
        f"--- QEMU {name} stderr ---\n{tail_lines(guest.stderr, 20)}"
    )


async def test_live_migration_on_user_backend(tmp_path: Path) -> None:
    await prerequisites()
    _, gid = user_ids(USER)
    with (
        trio.fail_after(TEST_TIMEOUT),
        ping_group_range(gid, gid),
        user_runtime_dir(USER) as rundir,
    ):
        port_a, port_b = free_ports(2, socket.SOCK_DGRAM)
        ports = {"a": port_a, "b": port_b}
        async with dns_server() as dns:

            def trionet(name: str) -> Any:
                args = user_backend_args(
                    dns_upstream_port=dns.port,
                    forwards_udp=[f"127.0.0.1/{ports[name]}:{GUEST_PORT}"],
                    control_socket=str(rundir / f"{name}.ctl"),
                )
                return user_trionet_service(
                    socket_path=rundir / f"{name}.sock",
                    log_path=tmp_path / f"trionet-{name}.log",
                    queue_pairs=PAIRS,
                    extra_args=[*args, "--mac", MAC, "--log-level", "debug"],
                    user=USER,
                )

            async def dhcp(guest: Guest) -> None:
                lease = await dhcp_lease(guest)
                print(f"lease: {lease.describe()}")

            async with trionet("a") as svc_a, trionet("b") as svc_b:
                setup = Setup(
                    name="user",
                    svc={"a": svc_a, "b": svc_b},
                    sock={n: rundir / f"{n}.sock" for n in "ab"},
                    ctl={n: rundir / f"{n}.ctl" for n in "ab"},
                    ping_target=str(GATEWAY_V4),
                    stream_dest={n: ("127.0.0.1", ports[n]) for n in "ab"},
                    stream_socket=lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                    configure=dhcp,
                )
                await migrate_and_check(setup, tmp_path)


TAP_HOST = "10.0.2.1"
TAP_GUEST = "10.0.2.15"


async def test_live_migration_on_tap_backend(tmp_path: Path) -> None:
    """The same on the tap backend: both trionets' taps on one bridge in a
    namespace (the "LAN"); the bridge learns the guest's new port from its
    first frames after the switch (its gratuitous ARP, its pings)."""
    await prerequisites()
    with trio.fail_after(TEST_TIMEOUT):
        async with network_namespace("tnmig-") as ns:
            await sh("ip", "link", "add", "br0", "type", "bridge", netns=ns)
            await sh("ip", "addr", "add", f"{TAP_HOST}/24", "dev", "br0", netns=ns)
            await sh("ip", "link", "set", "br0", "up", netns=ns)

            def trionet(name: str) -> Any:
                return trionet_service(
                    netns=ns,
                    socket_path=tmp_path / f"{name}.sock",
                    tap=f"tn{name}",
                    queue_pairs=PAIRS,
                    log_path=tmp_path / f"trionet-{name}.log",
                    extra_args=[
                        *("--control-socket", str(tmp_path / f"{name}.ctl")),
                        *("--log-level", "debug"),
                    ],
                )

            async def static_address(guest: Guest) -> None:
                await guest.check(f"ip addr add {TAP_GUEST}/24 dev eth0 && ip link set eth0 up")

            async with trionet("a") as svc_a, trionet("b") as svc_b:
                for tap in ("tna", "tnb"):
                    await wait_for_link(ns, tap)
                    await sh("ip", "link", "set", tap, "master", "br0", netns=ns)
                    await sh("ip", "link", "set", tap, "up", netns=ns)
                dest = (TAP_GUEST, GUEST_PORT)
                setup = Setup(
                    name="tap",
                    svc={"a": svc_a, "b": svc_b},
                    sock={n: tmp_path / f"{n}.sock" for n in "ab"},
                    ctl={n: tmp_path / f"{n}.ctl" for n in "ab"},
                    ping_target=TAP_HOST,
                    stream_dest={"a": dest, "b": dest},
                    stream_socket=lambda: netns_socket(ns),
                    configure=static_address,
                )
                await migrate_and_check(setup, tmp_path)


async def prerequisites() -> None:
    problems = prerequisite_problems()
    if problems:
        pytest.fail("e2e prerequisites missing: " + "; ".join(problems))
    await trio.to_thread.run_sync(ensure_guest_image)


class TcgGuestFailure(Exception):
    """The guest's kernel crashed, or the source never booted (QEMU's TCG)."""


async def tcg_guest_failure(src: Guest, dst: Guest, switched: bool) -> str | None:
    """What went wrong with a guest itself, if anything did: its kernel crashed,
    the source never booted, or the guest that should run (the destination once
    the migration completed) does not answer on its serial console, which
    does not depend on the network."""
    if accel_args()[1] == "kvm":
        return None
    for name, guest in (("source", src), ("destination", dst)):
        m = KERNEL_CRASH.search(guest.console)
        if m:
            return f"the {name} guest's kernel crashed ({m.group(0)!r})"
    if "TRIONET-GUEST-READY" not in src.console:
        return "the source guest did not finish booting"
    name, guest = ("destination", dst) if switched else ("source", src)
    try:
        await guest.check("true", timeout=CONSOLE_PROBE)
    except (GuestError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        return f"the {name} guest does not answer on its serial console"
    return None


async def migrate_and_check(setup: Setup, tmp_path: Path) -> None:
    for attempt in range(1, TCG_ATTEMPTS + 1):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        try:
            fig = await migrate_once(setup, run_dir)
        except Exception as exc:
            failure = tcg_failure_in(exc)
            if failure is None:
                raise
            if attempt == TCG_ATTEMPTS:
                raise AssertionError(f"{TCG_ATTEMPTS} attempts, the last: {failure}") from exc
            print(f"== attempt {attempt}: {str(failure).splitlines()[0]}; trying again")
            continue
        break
    report = json.dumps(
        {
            "backend": setup.name,
            "attempts": attempt,
            **fig.__dict__,
            "datagrams_lost": fig.datagrams_lost,
        },
        indent=1,
    )
    (tmp_path / "figures.json").write_text(report)
    print("migration figures:", report)
    assert fig.datagrams_bad == 0 and fig.datagrams_repeated == 0, report
    assert fig.datagrams_after_switch_good > 0, report
    assert fig.pings_lost <= MAX_LOST_PINGS, report


async def migrate_once(setup: Setup, run_dir: Path) -> Figures:
    fig = Figures()
    mig = run_dir / "migration.sock"
    async with (
        qemu(vm_argv(setup.sock["a"], run_dir / "a.qmp"), run_dir / "console-a.log") as src,
        qemu(
            vm_argv(setup.sock["b"], run_dir / "b.qmp", ["-incoming", f"unix:{mig}"]),
            run_dir / "console-b.log",
        ) as dst,
    ):
        try:
            await run_migration(fig, setup, src, dst, run_dir)
        except Exception as exc:  # a failed check, a guest gone (also inside a group)
            failure = await tcg_guest_failure(src, dst, fig.total_ms is not None)
            what = tail_lines("".join(traceback.format_exception(exc)), 40)
            details = (
                f"{what}\n{tails(setup.svc['a'], src, 'A (source)')}\n"
                f"{tails(setup.svc['b'], dst, 'B (destination)')}"
            )
            if failure is not None:
                raise TcgGuestFailure(f"{failure}\n{details}") from exc
            raise AssertionError(details) from exc
    return fig


def tcg_failure_in(exc: BaseException) -> TcgGuestFailure | None:
    """The TcgGuestFailure in ``exc``, also inside (nested) exception groups."""
    if isinstance(exc, TcgGuestFailure):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = tcg_failure_in(inner)
            if found is not None:
                return found
    return None


async def run_migration(fig: Figures, setup: Setup, src: Guest, dst: Guest, tmp_path: Path) -> None:
    print("== boot on the source")
    await src.wait_for("TRIONET-GUEST-READY", 180)
    await src.check("true", timeout=30)
    await setup.configure(src)
    await src.run(f"ethtool -L eth0 combined {PAIRS}", timeout=60)
    await wait_status(
        setup.ctl["a"],
        lambda st: [] if st["active_pairs"] == PAIRS else [f"active_pairs {st['active_pairs']}"],
        f"{PAIRS} active pairs on the source",
    )
    await src.check(
        f"socat -u UDP4-RECV:{GUEST_PORT},rcvbuf=4194304 OPEN:/tmp/rx,creat,append"
        " >/tmp/socat.log 2>&1 &"
    )
    await src.check(
        f"i=0; until netstat -uln | grep -q ':{GUEST_PORT} '; do"
        " [ $i -lt 100 ] || exit 1; i=$((i+1)); sleep 0.1; done"
    )
    await src.check(f"ping -i 0.2 {setup.ping_target} >/tmp/ping.out 2>&1 &")
    attempt = int(tmp_path.name.removeprefix("attempt"))
    stream = Stream(setup.stream_socket(), setup.stream_dest["a"], (attempt - 1) * ATTEMPT_BASE)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        await trio.sleep(STREAM_BEFORE)
        src_qmp, dst_qmp = await migrate_streaming(fig, stream, setup, tmp_path)
        await trio.sleep(STREAM_AFTER)
        nursery.cancel_scope.cancel()  # stop the stream
    fig.datagrams_sent = stream.sent
    assert stream.switched_at is not None
    fig.datagrams_after_switch_sent = stream.sent - stream.switched_at
    await trio.sleep(1)  # the last datagrams land
    await dst.check("kill -INT $(pidof ping); sleep 1", timeout=60)
    out = await dst.check("cat /tmp/ping.out")
    fig.pings_sent, received = ping_counts(out)
    fig.pings_lost = fig.pings_sent - received
    await dst.run("kill $(pidof socat)")
    out = await dst.check(awk_check(stream.switched_at, stream.base), timeout=180)
    m = re.search(r"good=(\d+) bad=(\d+) dup=(\d+) after=(\d+) .* stale=(\d+)", out)
    assert m, f"the guest's check printed {out!r}"
    fig.datagrams_good, fig.datagrams_bad, fig.datagrams_repeated = map(int, m.groups()[:3])
    fig.datagrams_after_switch_good = int(m.group(4))
    fig.datagrams_stale = int(m.group(5))
    missing = re.search(r"^missing:((?: \d+)+)$", out, re.M)
    fig.datagrams_missing = [int(n) for n in missing.group(1).split()] if missing else []
    print(f"guest check: {out.strip()}")
    st = await status(setup.ctl["b"])
    assert st["active_pairs"] == PAIRS, f"destination active_pairs {st['active_pairs']}"
    for p in st["pairs"][:PAIRS]:
        assert p["rx_ring"]["started"] and p["tx_ring"]["started"], st["pairs"][:PAIRS]
    counts = [(p["tx_packets"], p["rx_packets"]) for p in st["pairs"][:PAIRS]]
    print(f"destination per-pair (tx, rx): {counts}")
    src_qmp.close()
    dst_qmp.close()


async def migrate_streaming(
    fig: Figures, stream: Stream, setup: Setup, tmp_path: Path
) -> tuple[QMP, QMP]:
    print("== migrate")
    src_qmp = await QMP.connect(tmp_path / "a.qmp")
    dst_qmp = await QMP.connect(tmp_path / "b.qmp")
    t0 = time.monotonic()
    info = await migrate(src_qmp, f"unix:{tmp_path / 'migration.sock'}")
    stream.switch(setup.stream_dest["b"])
    print(f"query-migrate after {time.monotonic() - t0:.1f} s: {json.dumps(info)}")
    assert info["status"] == "completed", f"migration {info['status']}: {info}"
    fig.downtime_ms = info.get("downtime")
    fig.total_ms = info.get("total-time")
    with trio.fail_after(30):
        while (await dst_qmp.execute("query-status"))["status"] != "running":
            await trio.sleep(0.1)
    assert "dirty logging on" in setup.svc["a"].stderr(), "the source trionet never logged"
    print("== on the destination")
    return src_qmp, dst_qmp
