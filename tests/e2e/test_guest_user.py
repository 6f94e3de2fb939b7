"""End to end, user-mode backend: a 2-vCPU guest on trionet's own network stack.

    guest eth0 (2 pairs) --vhost-user--> trionet --backend user (as nobody) --> host loopback

trionet runs unprivileged (nobody, no capabilities) in the host's network namespace;
the gateway 10.0.2.2 / fd00:2::2 stands for the host's 127.0.0.1 / ::1, where the test
runs a UDP echo server and a DNS server (tests/e2e/loopback.py). One guest boot serves
every step; each step fails on its own, with trionet's log tail and the console tail:

1. DHCP: udhcpc gets 10.0.2.15/24, router 10.0.2.2, MTU 65520, nameserver 10.0.2.2;
2. ping 10.0.2.2 (trionet answers through an ICMP echo socket to 127.0.0.1);
3. SLAAC: an address in fd00:2::/64 from trionet's router advertisements;
4. ping6 fd00:2::2 (to ::1);
5. UDP echo: socat to 10.0.2.2:ECHO reaches the echo server on 127.0.0.1;
6. DNS: nslookup at 10.0.2.2 is forwarded to the DNS server on 127.0.0.1 (--dns-upstream);
7. inbound UDP (-u 127.0.0.1/UPORT:7777): a host socket's datagram reaches socat in the
   guest, and the guest's reply reaches that socket;
8. multiqueue: two UDP flows from vCPU 0 and vCPU 1 move packets on both pairs, and
   trionet's status (``user.flows``) puts each flow on the pair its vCPU transmits on;
9. UDP echo over IPv6: socat to [fd00:2::2]:ECHO reaches the echo server on ::1.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.guest import (
    Guest,
    GuestError,
    boot_guest,
    ensure_guest_image,
    prerequisite_problems,
    tail_lines,
)
from tests.e2e.hostnet import (
    Trionet,
    ping_group_range,
    user_ids,
    user_runtime_dir,
    user_trionet_service,
)
from tests.e2e.loopback import (
    DNS_A,
    DNS_AAAA,
    DNS_NAME,
    LoopbackService,
    dns_server,
    udp_echo_server,
)
from tests.e2e.ports import free_port
from tests.e2e.usernet import (
    GATEWAY_V4,
    GATEWAY_V6,
    GUEST_V4,
    PREFIX_V6,
    USER_MTU,
    dhcp_lease,
    nslookup,
    udp_exchange,
    udp_exchange_command,
    user_backend_args,
    wait_slaac_address,
)
from tests.integration.test_sandbox import assert_sandboxed

pytestmark = [pytest.mark.e2e, pytest.mark.root]

USER = "nobody"
PAIRS = 2
GUEST_UDP_PORT = 7777  # the guest side of the inbound -u forward
FLOW_PORTS = (40000, 40001)  # guest source ports of the flows from vCPU 0 and vCPU 1
FLOW_DATAGRAMS = 5
TEST_TIMEOUT = 300  # a hang fails the test instead of blocking the run

Status = dict[str, Any]


# ---- the run: what every step reaches, and how a step fails --------------------------


@dataclass
class Run:
    guest: Guest
    service: Trionet
    ctl: Path
    echo: LoopbackService
    dns: LoopbackService
    inbound_port: int  # host side of the -u forward, on 127.0.0.1

    def tails(self) -> str:
        return (
            f"--- trionet (pid {self.service.pid}, status {self.service.returncode}) log tail ---\n"
            f"{tail_lines(self.service.stderr(), 60)}\n"
            f"--- guest console tail ---\n{tail_lines(self.guest.console, 40)}"
        )


@asynccontextmanager
async def step(run: Run, name: str) -> AsyncIterator[None]:
    """One step: a failure names it and carries both logs' tails."""
    print(f"== step: {name}")
    try:
        yield
    except (AssertionError, GuestError, OSError, trio.TooSlowError) as exc:
        detail = tail_lines(str(exc) or type(exc).__name__, 60)
        raise AssertionError(f"step '{name}' failed: {detail}\n{run.tails()}") from exc
    if run.service.returncode is not None:
        raise AssertionError(f"trionet exited during step '{name}'\n{run.tails()}")


# ---- trionet status -----------------------------------------------------------------


async def status(ctl: Path) -> Status:
    """``trionet status --control-socket CTL``, parsed (OSError when it fails)."""
    argv = [sys.executable, "-m", "trionet", "status", "--control-socket", str(ctl)]
    res = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    if res.returncode != 0:
        raise OSError(res.stderr.decode(errors="replace").strip() or f"status {res.returncode}")
    st: Status = json.loads(res.stdout)
    return st


async def wait_status(
    ctl: Path, problems: Callable[[Status], list[str]], what: str, timeout: float = 20
) -> Status:
    """Poll trionet's status until ``problems(status)`` is empty; fail with the last
    problems otherwise."""
    last: list[str] = ["no status read yet"]
    with trio.move_on_after(timeout):
        while True:
            try:
                st = await status(ctl)
            except OSError as exc:
                last = [f"control socket: {exc}"]
            else:
                last = problems(st)
                if not last:
                    return st
            await trio.sleep(0.2)
    raise AssertionError(f"{what}: not reached in {timeout} s: " + "; ".join(last))


def pair_counters(st: Status) -> dict[int, tuple[int, int]]:
    """(tx_packets, rx_packets) per pair index: tx is guest -> host, rx host -> guest."""
    return {int(p["index"]): (int(p["tx_packets"]), int(p["rx_packets"])) for p in st["pairs"]}


def udp_flows(st: Status, guest_port: int) -> list[dict[str, Any]]:
    flows: list[dict[str, Any]] = st.get("user", {}).get("flows", [])
    return [f for f in flows if f.get("proto") == "udp" and f.get("guest_port") == guest_port]


# ---- host helpers ---------------------------------------------------------------------


async def host_exchange(port: int, payload: bytes, attempts: int = 3) -> bytes:
    """Send `payload` to 127.0.0.1:port from one connected socket until a reply comes
    (5 s per attempt); return the reply."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", port))
        for _ in range(attempts):
            await sock.send(payload)
            with trio.move_on_after(5):
                return await sock.recv(65535)
    raise AssertionError(f"no reply on 127.0.0.1:{port} after {attempts} datagrams")


def xps_map(sysfs: str) -> dict[int, int]:
    """vCPU -> TX queue from ``<queue dir> <xps_cpus hex mask>`` lines."""
    cpu_queue: dict[int, int] = {}
    for m in re.finditer(r"tx-(\d+) ([0-9a-f,]+)", sysfs):
        mask = int(m.group(2).replace(",", ""), 16)
        for cpu in range(mask.bit_length()):
            if mask >> cpu & 1:
                cpu_queue.setdefault(cpu, int(m.group(1)))
    return cpu_queue


# ---- the steps ------------------------------------------------------------------------


async def check_lease(run: Run) -> None:
    lease = await dhcp_lease(run.guest)
    print(lease.udhcpc_output.rstrip())
    print(f"lease: {lease.describe()}")
    assert lease.address == GUEST_V4, f"eth0 has {lease.address}, want {GUEST_V4}"
    assert lease.router == GATEWAY_V4, f"default route via {lease.router}, want {GATEWAY_V4}"
    assert lease.mtu == USER_MTU, f"eth0 MTU {lease.mtu}, want {USER_MTU} (DHCP option 26)"
    assert str(GATEWAY_V4) in lease.nameservers, f"resolv.conf nameservers {lease.nameservers}"


async def check_ping(run: Run, cmd: str) -> None:
    status_, out = await run.guest.run(f"{cmd} -c 3 -W 5", timeout=90)
    print(out.rstrip())
    assert status_ == 0 and "3 packets received" in out, out


async def check_slaac(run: Run) -> None:
    addresses = await wait_slaac_address(run.guest)
    print("global IPv6 addresses:", ", ".join(map(str, addresses)))
    ours = [a for a in addresses if a.network == PREFIX_V6]
    assert ours, f"no /64 address in {PREFIX_V6}: {addresses}"


async def check_udp_echo(run: Run, gateway: IPv4Address | IPv6Address, want_received: int) -> None:
    payload = f"hello-{secrets.token_hex(4)}"
    out = await udp_exchange(run.guest, gateway, run.echo.port, [payload])
    assert out.strip() == payload, f"socat printed {out!r}, want {payload!r}"
    assert run.echo.received >= want_received, run.echo.describe()
    print(run.echo.describe())


async def check_dns(run: Run) -> None:
    before = run.dns.received
    out = await nslookup(run.guest, DNS_NAME, GATEWAY_V4)
    print(out.rstrip())
    assert run.dns.received > before, f"the upstream saw no query: {run.dns.describe()}"
    assert re.search(rf"Address:\s+{re.escape(str(DNS_A))}\b", out), out
    assert str(DNS_AAAA) in out, out


async def check_inbound(run: Run) -> None:
    guest = run.guest
    # Each datagram gets a child that writes it to tee (the log) and sends back what
    # tee echoes, to the datagram's source.
    await guest.check(
        f"socat -T 5 UDP4-RECVFROM:{GUEST_UDP_PORT},fork"
        " SYSTEM:'tee -a /tmp/udp-in.txt' >/tmp/udp-in.log 2>&1 &"
    )
    await guest.check(
        f"i=0; until netstat -uln | grep -q ':{GUEST_UDP_PORT} '; do"
        " [ $i -lt 100 ] || exit 1; i=$((i+1)); sleep 0.1; done"
    )
    payload = f"inbound-{secrets.token_hex(4)}\n".encode()
    reply = await host_exchange(run.inbound_port, payload)
    assert reply == payload, f"reply {reply!r}, want {payload!r}"
    seen = await guest.check("cat /tmp/udp-in.txt")
    assert payload.decode().strip() in seen, f"the guest received {seen!r}"
    await guest.run("kill $(pidof socat)")


async def check_multiqueue(run: Run) -> None:
    guest, ctl = run.guest, run.ctl
    await guest.run(f"ethtool -L eth0 combined {PAIRS}", timeout=60)  # fails if unchanged
    current = await guest.check("ethtool -l eth0")
    m = re.search(r"Current hardware settings:.*?Combined:\s*(\d+)", current, re.S)
    assert m and int(m.group(1)) == PAIRS, current
    await wait_status(
        ctl,
        lambda st: [] if st["active_pairs"] == PAIRS else [f"active_pairs {st['active_pairs']}"],
        f"{PAIRS} active pairs",
    )
    xps = await guest.check(
        "cd /sys/class/net/eth0/queues; for q in tx-*; do echo $q $(cat $q/xps_cpus); done"
    )
    cpu_pair = xps_map(xps)
    print(f"guest XPS (vCPU -> TX queue): {cpu_pair}")
    assert sorted(cpu_pair.get(cpu, -1) for cpu in range(PAIRS)) == list(range(PAIRS)), xps

    before = pair_counters(await status(ctl))
    flows = [
        udp_exchange_command(
            GATEWAY_V4,
            run.echo.port,
            [f"cpu{cpu}-{i}" for i in range(FLOW_DATAGRAMS)],
            source_port=FLOW_PORTS[cpu],
            cpu=cpu,
        )
        + f" >/tmp/flow{cpu}.out 2>&1 &"
        for cpu in range(PAIRS)
    ]
    await guest.check(" ".join(flows) + " wait", timeout=90)
    for cpu in range(PAIRS):
        out = await guest.check(f"cat /tmp/flow{cpu}.out")
        got = [line for line in out.split() if line.startswith(f"cpu{cpu}-")]
        assert len(got) == FLOW_DATAGRAMS, f"flow from vCPU {cpu} got back {out!r}"

    def problems(st: Status) -> list[str]:
        if not isinstance(st.get("user", {}).get("flows"), list):
            return [f"the status has no user.flows list (top-level keys: {sorted(st)})"]
        found = []
        now = pair_counters(st)
        for pair in range(PAIRS):
            tx, rx = (now[pair][i] - before[pair][i] for i in (0, 1))
            if tx <= 0 or rx <= 0:
                found.append(f"pair {pair} moved tx+{tx} rx+{rx}")
        for cpu, port in enumerate(FLOW_PORTS):
            flows = udp_flows(st, port)
            pairs = sorted({int(f["pair"]) for f in flows})
            if pairs != [cpu_pair[cpu]]:
                found.append(
                    f"user.flows for guest port {port} (vCPU {cpu}, TX queue "
                    f"{cpu_pair[cpu]}) are on pairs {pairs}: {flows}"
                )
        return found

    st = await wait_status(ctl, problems, "both pairs busy, each flow on its vCPU's pair")
    print("per-pair counters (tx, rx):", pair_counters(st))
    for port in FLOW_PORTS:
        print(f"user.flows for guest port {port}:", udp_flows(st, port))


# ---- the test -------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [False, True], ids=["trio", "threads"])
async def test_guest_on_user_backend(tmp_path: Path, threads: bool) -> None:
    """Every check below, with the pairs on the Trio thread and with ``--threads``."""
    problems = prerequisite_problems()
    if problems:
        pytest.fail("e2e prerequisites missing: " + "; ".join(problems))
    await trio.to_thread.run_sync(ensure_guest_image)
    _, gid = user_ids(USER)
    with (
        trio.fail_after(TEST_TIMEOUT),
        ping_group_range(gid, gid),  # trionet's ICMP echo sockets
        user_runtime_dir(USER) as rundir,
    ):
        sock, ctl = rundir / "vhost.sock", rundir / "control.sock"
        inbound_port = free_port(socket.SOCK_DGRAM)
        async with (
            udp_echo_server(hosts=("127.0.0.1", "::1")) as echo,
            dns_server() as dns,
        ):
            args = user_backend_args(
                dns_upstream_port=dns.port,
                forwards_udp=[f"127.0.0.1/{inbound_port}:{GUEST_UDP_PORT}"],
                control_socket=str(ctl),
            )
            if threads:
                args = [*args, "--threads"]
            async with (
                user_trionet_service(
                    socket_path=sock,
                    log_path=tmp_path / "trionet.log",
                    queue_pairs=PAIRS,
                    extra_args=args,
                    user=USER,
                ) as service,
                boot_guest(
                    netdev_args=None,
                    vhost_user_socket=str(sock),
                    queue_pairs=PAIRS,
                    smp=PAIRS,
                    log_path=tmp_path / "console.log",
                ) as guest,
            ):
                print(f"guest booted in {guest.boot_seconds:.1f} s; trionet pid {service.pid}")
                run = Run(guest, service, ctl, echo, dns, inbound_port)
                async with step(run, "DHCP lease (address, router, MTU 65520, DNS)"):
                    await check_lease(run)
                async with step(run, f"ping {GATEWAY_V4}"):
                    await check_ping(run, f"ping {GATEWAY_V4}")
                async with step(run, f"SLAAC address in {PREFIX_V6}"):
                    await check_slaac(run)
                async with step(run, f"ping6 {GATEWAY_V6}"):
                    await check_ping(run, f"ping6 {GATEWAY_V6}")
                async with step(run, f"UDP echo via {GATEWAY_V4} (host 127.0.0.1)"):
                    await check_udp_echo(run, GATEWAY_V4, 1)
                async with step(run, f"DNS {DNS_NAME} at {GATEWAY_V4} (--dns-upstream)"):
                    await check_dns(run)
                async with step(run, f"inbound UDP 127.0.0.1:{inbound_port} -> guest"):
                    await check_inbound(run)
                async with step(run, f"multiqueue: UDP flows from {PAIRS} vCPUs"):
                    await check_multiqueue(run)
                async with step(run, f"UDP echo via {GATEWAY_V6} (host ::1)"):
                    await check_udp_echo(run, GATEWAY_V6, run.echo.received + 1)
                assert_sandboxed(service.pid, uid=user_ids(USER)[0])  # after all that traffic
        assert service.returncode in (0, -15), f"trionet exit status {service.returncode}"
