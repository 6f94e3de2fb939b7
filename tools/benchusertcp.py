"""iperf3 TCP through three user-mode stacks, with a network namespace as the guest.

The rig is tools/benchudp.py's (one fresh unprivileged namespace per stack, interface
tng0, 10.0.2.0/24 with the gateway 10.0.2.2 mapped to the host's 127.0.0.1; every
stack serves the namespace's tap itself: trionet with --netns, pasta, slirp4netns;
each stack on CPU 0): its set-up is imported from there, including the short UDP
burst that checks the path.  Each stack keeps its default MTU, as in the QEMU guest
rig (trionet and pasta 65520, slirp4netns 1500); tools/bench --usertcp-mtu N gives
all three the same one.  Then iperf3 -s -B 127.0.0.1 runs on the host and the client in the
namespace, pinned to CPU 1 (the server too):

  out  iperf3 -c 10.0.2.2 -p PORT -t SECONDS -O OMIT -J       guest -> host
  in   iperf3 -c 10.0.2.2 -p PORT -t SECONDS -O OMIT -J -R    host -> guest

  gbps       receiver's Gbit/s (iperf3 sum_received, omitted seconds excluded).
  min_1s     the slowest 1 s interval's Gbit/s (near 0: the connection stalled; Debian
             bookworm's pasta, 0.0~git20230309, stalls this way guest -> host here).
  max_1s     the fastest 1 s interval's Gbit/s (for a stack that stalls: what it
             carries while it does not).
  retrans    the sender's retransmits.
  stack_cpu  CPU time of the stack's process (all threads) over the run / its length.
  vs_passt   trionet gbps / pasta's (pasta is passt's namespace mode), same direction.
  vs_slirp   trionet gbps / slirp4netns', same direction.

Traffic only crosses 127.0.0.1 and the namespaces made here; every process is stopped
by pid and every namespace deleted afterwards.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl
import benchudp

STACKS = benchudp.STACKS
# Each stack's default MTU, as in the QEMU guest rig (tools/benchguesttcp.py).
DEFAULT_MTU = {"trionet": 65520, "pasta": 65520, "slirp4netns": 1500}
DIRECTIONS = ("out", "in")


@dataclass
class UserTcpRow:
    stack: str
    direction: str  # "out" guest -> host, "in" host -> guest
    seconds: float
    gbps: float | None = None
    min_gbps: float | None = None  # slowest 1 s interval after the omitted ones
    max_gbps: float | None = None  # fastest one
    retransmits: int | None = None
    stack_cpu: float | None = None
    vs_passt: float | None = None
    vs_slirp: float | None = None
    error: str | None = None


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iperf_result(text: str) -> tuple[float, float | None, float | None, int | None]:
    """(receiver Gbit/s, slowest and fastest interval's Gbit/s, sender retransmits) from
    iperf3 -J output."""
    data = json.loads(text[text.index("{") : text.rindex("}") + 1])
    if "error" in data:
        raise bl.BenchError(f"iperf3: {data['error']}")
    end = data["end"]
    retr = end.get("sum_sent", {}).get("retransmits")
    rates = [
        float(iv["sum"]["bits_per_second"]) / 1e9
        for iv in data.get("intervals", [])
        if not iv["sum"].get("omitted") and float(iv["sum"]["seconds"]) > 0.5
    ]
    low, high = (min(rates), max(rates)) if rates else (None, None)
    return float(end["sum_received"]["bits_per_second"]) / 1e9, low, high, retr


def ratios(rows: Sequence[UserTcpRow]) -> None:
    got = {(r.stack, r.direction): r.gbps for r in rows}
    for r in rows:
        if r.stack == "trionet" and r.gbps is not None:
            if base := got.get(("pasta", r.direction)):
                r.vs_passt = r.gbps / base
            if base := got.get(("slirp4netns", r.direction)):
                r.vs_slirp = r.gbps / base


def _measure(stack: benchudp._Stack, direction: str, seconds: float, omit: int) -> UserTcpRow:
    row = UserTcpRow(stack.name, direction, seconds)
    port = free_tcp_port()
    pin = bl.cpu_pin_prefix(bl.FRONTEND_CPU)
    server = stack._spawn(
        "iperf3 server", [*pin, "iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)]
    )
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline or not server.alive():
                    raise bl.BenchError(f"iperf3 server did not listen:\n{server.tail()}") from None
                time.sleep(0.05)
        argv = [*bl.netns_exec(stack.ns), *pin, "iperf3", "-c", benchudp.GATEWAY]
        argv += ["-p", str(port), "-t", f"{seconds:g}", "-O", str(omit), "-J"]
        if direction == "in":
            argv.append("-R")
        client = stack._spawn("iperf3 client", argv)
        assert stack.stack is not None
        time.sleep(omit + 0.5)
        cpu0 = bl.cpu_seconds(stack.stack.pid)
        code = bl.wait_exit(client, timeout=seconds + omit + 30.0)
        cpu1 = bl.cpu_seconds(stack.stack.pid)
        text = "\n".join(ln.text for ln in client.snapshot())
        if code != 0:
            raise bl.BenchError(f"iperf3 client exited with {code}:\n{client.tail()}")
        row.gbps, row.min_gbps, row.max_gbps, row.retransmits = iperf_result(text)
        if cpu0 is not None and cpu1 is not None and cpu1[1] > cpu0[1]:
            row.stack_cpu = (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1])
        for proc in stack.watched:
            if not proc.alive():
                raise bl.BenchError(f"{proc.name} exited during the run:\n{proc.tail()}")
    except (bl.BenchError, ValueError, KeyError, TypeError) as exc:
        row.error = str(exc)
    finally:
        for proc in [p for p in stack.procs if p.name.startswith("iperf3")]:
            bl.stop(proc, grace=2.0)
            stack.procs.remove(proc)
    return row


def run_usertcp(
    workdir: Path,
    python: str,
    seconds: float,
    trionet_args: list[str],
    *,
    stacks: Sequence[str] = STACKS,
    directions: Sequence[str] = DIRECTIONS,
    omit: int = 1,
    progress: bool = False,
    mtu: int | None = None,
) -> list[UserTcpRow]:
    """One row per (stack, direction); failures in UserTcpRow.error.  ``mtu``:
    every stack's link MTU (default: each stack's own, DEFAULT_MTU)."""

    def say(text: str, end: str = "\n") -> None:
        if progress:
            print(text, end=end, file=sys.stderr, flush=True)

    rows: list[UserTcpRow] = []
    in_source = benchudp._host_source_address()
    for seq, name in enumerate((s for s in STACKS if s in stacks), 1):
        stack: benchudp._Stack | None = None
        try:
            flood = bl.build_c_tool(benchudp.UDPFLOOD_SRC, workdir)
            say(f"usertcp {name}: setting up ...", end=" ")
            stack = benchudp._Stack(
                name=name,
                workdir=workdir,
                flood=flood,
                seq=1000 + seq,
                python=python,
                trionet_args=trionet_args,
                in_source=in_source,
                mtu=mtu or DEFAULT_MTU[name],
            )
            stack.logbase = workdir / f"usertcp-{name}"
            stack.setup()
            say("ok")
            for direction in directions:
                say(f"usertcp {name} {direction} ...", end=" ")
                rows.append(_measure(stack, direction, seconds, omit))
                r = rows[-1]
                say("FAILED" if r.error else f"{r.gbps:.2f} Gbit/s")
        except bl.BenchError as exc:
            say("FAILED")
            done = {r.direction for r in rows if r.stack == name}
            rows += [
                UserTcpRow(name, d, seconds, error=str(exc)) for d in directions if d not in done
            ]
        finally:
            if stack is not None:
                stack.cleanup()
    ratios(rows)
    return rows


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: Sequence[UserTcpRow], what: str = "stack") -> None:
    hdr = f"{what:<11} {'dir':<3} {'gbps':>7} {'min_1s':>7} {'max_1s':>7} {'retrans':>7} "
    hdr += f"{'stk_cpu':>7} "
    hdr += f"{'vs_passt':>8} {'vs_slirp':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        lead = f"{r.stack:<11} {r.direction:<3} "
        if r.error:
            print(lead + f"{'FAILED':>7}")
            continue
        print(
            lead
            + f"{fmt(r.gbps, '.3f'):>7} {fmt(r.min_gbps, '.3f'):>7} {fmt(r.max_gbps, '.3f'):>7} "
            f"{fmt(r.retransmits, 'd'):>7} {fmt(r.stack_cpu):>7} {fmt(r.vs_passt):>8} "
            f"{fmt(r.vs_slirp):>8}"
        )


def describe(seconds: float, omit: int, mtu: int | None = None) -> str:
    mtus = f"MTU {mtu}" if mtu else "each at its default MTU (65520; slirp4netns 1500)"
    return (
        f"usertcp: iperf3 Gbit/s, {seconds:g} s after {omit} s omitted, between a network "
        f"namespace (the guest) and the host's 127.0.0.1 through user-mode stacks on CPU "
        f"{bl.BACKEND_CPU}, {mtus} (iperf3 on CPU {bl.FRONTEND_CPU}); "
        "out = guest to host, in = host to guest (-R); vs_* = trionet / that stack's "
        "(see tools/benchusertcp.py)"
    )
