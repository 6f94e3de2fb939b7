"""iperf3 TCP between a QEMU guest and the host's 127.0.0.1 through three user-mode
network back ends, the same guest image (tools/build-guest; KVM where the CPU has
vmx/svm, multi-threaded TCG otherwise, as the e2e tests choose) booted once per back end:

  trionet  python -m trionet --backend user --queue-pairs 1 --address 10.0.2.15/24
           --gateway 10.0.2.2 -4 TRIONET_ARGS, as nobody without capabilities (the
           e2e tests' user_trionet_service); QEMU -netdev vhost-user.
  passt    passt -f -q -1 -4 -s SOCKET -a 10.0.2.15 -n 24 -g 10.0.2.2, as nobody
           (the gateway maps to the host's loopback by default); QEMU -netdev
           stream,id=net0,server=off,addr.type=unix,addr.path=SOCKET.
  slirp    QEMU -netdev user,id=net0 (libslirp inside QEMU; 10.0.2.2 is the host's
           loopback, the guest gets 10.0.2.15 by DHCP).

Each back end keeps its default MTU (trionet and passt 65520, slirp 1500).  The guest
takes a lease with udhcpc, then runs, against iperf3 -s -B 127.0.0.1 on the host:

  out  iperf3 -c 10.0.2.2 -p PORT -t SECONDS -O OMIT -J       guest -> host
  in   iperf3 -c 10.0.2.2 -p PORT -t SECONDS -O OMIT -J -R    host -> guest

  gbps      receiver's Gbit/s (omitted seconds excluded); min_1s = the slowest 1 s
            interval; retrans = sender's retransmits.
  stk_cpu   CPU time of trionet / passt (all threads) over the run / its length; for
            slirp, which runs in QEMU's main thread, that thread's.
  vs_*      trionet gbps / passt's or slirp's, same direction.

Placement (2 CPUs): trionet (every thread) and passt on CPU 0, and QEMU's main thread
(its I/O loop, where slirp runs) on CPU 0 in all three runs; QEMU's vCPU threads float;
the host's iperf3 server on CPU 1.  Only 127.0.0.1 is reached; every process started
here is stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
for _p in (str(TOOLS), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
import benchlib as bl  # noqa: E402
import benchusertcp as ut  # noqa: E402

from tests.e2e import guest as eguest  # noqa: E402
from tests.e2e import hostnet, usernet  # noqa: E402

BACKENDS = ("trionet", "passt", "slirp")
DIRECTIONS = ut.DIRECTIONS
USER = "nobody"
GATEWAY = str(usernet.GATEWAY_V4)


def _pin_threads(pid: int, cpu: int, main_only: bool = False) -> None:
    tids = [pid] if main_only else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, {cpu})


def _thread_cpu(pid: int, tid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """Re-raise a nursery's single exception as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def _measure(
    guest: eguest.Guest,
    name: str,
    direction: str,
    port: int,
    seconds: float,
    omit: int,
    cpu_of: tuple[int, bool],
    watched: Sequence[bl.Proc] = (),
) -> ut.UserTcpRow:
    row = ut.UserTcpRow(name, direction, seconds)
    pid, main_only = cpu_of

    def cpu() -> tuple[float, float] | None:
        if main_only:
            c = _thread_cpu(pid, pid)
            return None if c is None else (c, time.monotonic())
        return bl.cpu_seconds(pid)

    cmd = f"iperf3 -c {GATEWAY} -p {port} -t {seconds:g} -O {omit} -J"
    if direction == "in":
        cmd += " -R"
    try:
        async with _unwrapped(), trio.open_nursery() as nursery:
            samples: list[tuple[float, float] | None] = []

            async def sample() -> None:
                await trio.sleep(omit + 1.0)
                samples.append(cpu())
                await trio.sleep(seconds - 1.0)
                samples.append(cpu())

            nursery.start_soon(sample)
            status, out = await guest.run(cmd, timeout=seconds + omit + 30)
        if status != 0:
            raise bl.BenchError(f"iperf3 in the guest exited {status}: {out[-1500:]}")
        row.gbps, row.min_gbps, row.max_gbps, row.retransmits = ut.iperf_result(out)
        if len(samples) == 2 and samples[0] and samples[1] and samples[1][1] > samples[0][1]:
            row.stack_cpu = (samples[1][0] - samples[0][0]) / (samples[1][1] - samples[0][1])
        for proc in watched:
            if not proc.alive():
                raise bl.BenchError(f"{proc.name} exited during the run:\n{proc.tail()}")
    except (bl.BenchError, eguest.GuestError, ValueError, KeyError, TypeError) as exc:
        row.error = str(exc)
    return row


async def _one_backend(
    name: str,
    workdir: Path,
    port: int,
    seconds: float,
    omit: int,
    directions: Sequence[str],
    trionet_args: Sequence[str],
    say: object,
) -> list[ut.UserTcpRow]:
    rows: list[ut.UserTcpRow] = []
    log = workdir / f"guesttcp-{name}"
    with contextlib.ExitStack() as stack, hostnet.user_runtime_dir(USER) as rundir:
        sock = rundir / f"{name}.sock"
        helper_pid: int | None = None
        watched: list[bl.Proc] = []
        async with contextlib.AsyncExitStack() as astack:
            vhost: str | None = None
            netdev: list[str] | None = None
            if name == "trionet":
                args = ["--address", f"{usernet.GUEST_V4}", "--gateway", GATEWAY, "-4"]
                service = await astack.enter_async_context(
                    hostnet.user_trionet_service(
                        socket_path=sock,
                        log_path=log.with_suffix(".trionet.log"),
                        extra_args=[*args, *trionet_args],
                        user=USER,
                    )
                )
                helper_pid = service.pid
                _pin_threads(helper_pid, bl.BACKEND_CPU)
                vhost = str(sock)
            elif name == "passt":
                uid, gid = hostnet.user_ids(USER)
                argv = [*bl.cpu_pin_prefix(bl.BACKEND_CPU), "setpriv", f"--reuid={uid}"]
                argv += [f"--regid={gid}", "--clear-groups", "passt", "-f", "-q", "-1", "-4"]
                argv += ["-s", str(sock), "-a", str(usernet.GUEST_V4.ip), "-n"]
                argv += [str(usernet.GUEST_V4.network.prefixlen), "-g", GATEWAY]
                passt = bl.spawn("passt", argv, log.with_suffix(".passt.log"))
                stack.callback(bl.stop, passt, grace=5.0)
                bl.wait_for_socket(sock, passt, timeout=15.0, poll=0.01)
                helper_pid = passt.pid
                watched.append(passt)
                netdev = [
                    "-netdev",
                    f"stream,id=net0,server=off,addr.type=unix,addr.path={sock}",
                ]
            else:
                netdev = ["-netdev", "user,id=net0"]
            guest = await astack.enter_async_context(
                eguest.boot_guest(
                    netdev_args=netdev,
                    vhost_user_socket=vhost,
                    log_path=log.with_suffix(".console.log"),
                )
            )
            qemu_pid = guest.proc.pid
            _pin_threads(qemu_pid, bl.BACKEND_CPU, main_only=True)
            if helper_pid is not None:
                _pin_threads(helper_pid, bl.BACKEND_CPU)  # threads made on activation
            lease = await usernet.dhcp_lease(guest)
            say(f"boot {guest.boot_seconds:.1f} s, {lease.describe()}")
            cpu_of = (helper_pid, False) if helper_pid is not None else (qemu_pid, True)
            for direction in directions:
                say(f"guesttcp {name} {direction} ...", end=" ")
                row = await _measure(guest, name, direction, port, seconds, omit, cpu_of, watched)
                if row.error and name == "trionet":
                    row.error += "\n--- trionet log ---\n" + eguest.tail_lines(service.stderr(), 40)
                rows.append(row)
                say("FAILED" if row.error else f"{row.gbps:.3f} Gbit/s")
    return rows


def _iperf_server(log: Path) -> tuple[int, bl.Proc]:
    """iperf3 -s on 127.0.0.1, pinned to the frontend CPU; (port, process) once it
    accepts connections."""
    port = ut.free_tcp_port()
    pin = bl.cpu_pin_prefix(bl.FRONTEND_CPU)
    server = bl.spawn(
        "iperf3 server", [*pin, "iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], log
    )
    deadline = time.monotonic() + 10.0
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return port, server
        except OSError:
            if time.monotonic() > deadline or not server.alive():
                bl.stop(server, grace=2.0)
                raise bl.BenchError(f"iperf3 server did not listen:\n{server.tail()}") from None
            time.sleep(0.05)


def run_guesttcp(
    workdir: Path,
    seconds: float,
    trionet_args: list[str],
    *,
    backends: Sequence[str] = BACKENDS,
    directions: Sequence[str] = DIRECTIONS,
    omit: int = 1,
    progress: bool = False,
) -> list[ut.UserTcpRow]:
    """One row per (back end, direction); failures in UserTcpRow.error.  trionet runs
    under this interpreter (sys.executable), as the e2e harness starts it."""

    def say(text: str, end: str = "\n") -> None:
        if progress:
            print(text, end=end, file=sys.stderr, flush=True)

    eguest.ensure_guest_image()
    rows: list[ut.UserTcpRow] = []
    for name in (b for b in BACKENDS if b in backends):
        say(f"guesttcp {name}: booting ...", end=" ")
        server: bl.Proc | None = None
        try:
            # A fresh server per back end: a client stalled in one run cannot keep the
            # next back end's server busy.
            port, server = _iperf_server(workdir / f"guesttcp-{name}.iperf3.log")
            rows += trio.run(
                _one_backend, name, workdir, port, seconds, omit, directions, trionet_args, say
            )
        except Exception as exc:  # boot, lease, helper start-up
            say("FAILED")
            done = {r.direction for r in rows if r.stack == name}
            rows += [
                ut.UserTcpRow(name, d, seconds, error=_describe(exc))
                for d in directions
                if d not in done
            ]
        finally:
            if server is not None:
                bl.stop(server, grace=2.0)
    got = {(r.stack, r.direction): r.gbps for r in rows}
    for r in rows:
        if r.stack == "trionet" and r.gbps is not None:
            if base := got.get(("passt", r.direction)):
                r.vs_passt = r.gbps / base
            if base := got.get(("slirp", r.direction)):
                r.vs_slirp = r.gbps / base
    return rows


def prerequisite_problems() -> list[str]:
    problems = list(eguest.prerequisite_problems())
    if os.geteuid() != 0:
        problems.append("must run as root (to run trionet and passt as nobody)")
    for tool in ("passt", "iperf3", "setpriv", "taskset"):
        if not any(Path(d, tool).exists() for d in os.environ.get("PATH", "").split(":")):
            problems.append(f"{tool} not found in PATH")
    return problems


def describe(seconds: float, omit: int) -> str:
    return (
        f"guesttcp: iperf3 Gbit/s, {seconds:g} s after {omit} s omitted, QEMU guest "
        f"({' '.join(eguest.accel_args()[:2])}) to/from the host's 127.0.0.1 via 10.0.2.2; "
        f"trionet, passt and QEMU's main thread on CPU {bl.BACKEND_CPU}, vCPUs float; "
        "out = guest to host, in = host to guest; vs_passt column = trionet / passt, "
        "vs_slirp = trionet / QEMU -netdev user (see tools/benchguesttcp.py)"
    )
