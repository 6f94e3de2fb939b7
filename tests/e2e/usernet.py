"""The guest's view of trionet's user-mode backend, shared by its e2e test and the demo.

The addressing both pass to ``trionet --backend user`` (passt's defaults: the guest is
10.0.2.15, the gateway 10.0.2.2 stands for the host's 127.0.0.1, fd00:2::2 for ::1), and
what the guest does with it: take a DHCP lease, wait for its SLAAC address, send UDP
with socat, resolve with nslookup. Each returns what it saw; the callers judge.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

from tests.e2e.guest import Guest, GuestError

GUEST_V4 = IPv4Interface("10.0.2.15/24")
GATEWAY_V4 = IPv4Address("10.0.2.2")  # the host's 127.0.0.1
GUEST_V6 = IPv6Interface("fd00:2::15/64")
GATEWAY_V6 = IPv6Address("fd00:2::2")  # the host's ::1
PREFIX_V6 = IPv6Network("fd00:2::/64")
USER_MTU = 65520  # the user backend's default link MTU, advertised by DHCP option 26

# -O mtu: busybox udhcpc does not ask for option 26 by itself; -t/-T: 5 tries, 2 s apart.
UDHCPC = "udhcpc -i eth0 -n -q -O mtu -t 5 -T 2"
SOCAT_WAIT = 3  # seconds socat waits for replies after its input ends


def user_backend_args(
    *,
    dns_upstream_port: int,
    forwards_udp: Sequence[str] = (),
    control_socket: str | None = None,
) -> list[str]:
    """trionet's command line for this addressing (without --socket-path, --backend
    and --queue-pairs, which the harness adds)."""
    args = ["--address", str(GUEST_V4), "--gateway", str(GATEWAY_V4)]
    args += ["--address", str(GUEST_V6), "--gateway", str(GATEWAY_V6)]
    args += ["--dns-upstream", f"127.0.0.1:{dns_upstream_port}"]
    for spec in forwards_udp:
        args += ["-u", spec]
    if control_socket is not None:
        args += ["--control-socket", control_socket]
    return args


@dataclass(frozen=True, slots=True)
class Lease:
    """eth0's configuration after udhcpc applied its lease."""

    address: IPv4Interface | None
    router: IPv4Address | None
    mtu: int
    nameservers: tuple[str, ...]
    udhcpc_output: str

    def describe(self) -> str:
        dns = ", ".join(self.nameservers) or "none"
        return f"address {self.address}, router {self.router}, MTU {self.mtu}, DNS {dns}"


async def dhcp_lease(guest: Guest, timeout: float = 60) -> Lease:
    """Run udhcpc on eth0 (GuestError when it gets no lease); read back what its
    script applied."""
    out = await guest.check(UDHCPC, timeout=timeout)
    m = re.search(r"inet (\S+)", await guest.check("ip -4 -o addr show dev eth0"))
    r = re.search(r"default via (\S+)", await guest.check("ip -4 route show default"))
    mtu = int((await guest.check("cat /sys/class/net/eth0/mtu")).strip())
    resolv = await guest.check("cat /etc/resolv.conf")
    nameservers = tuple(re.findall(r"^nameserver\s+(\S+)", resolv, re.M))
    return Lease(
        address=IPv4Interface(m.group(1)) if m else None,
        router=IPv4Address(r.group(1)) if r else None,
        mtu=mtu,
        nameservers=nameservers,
        udhcpc_output=out,
    )


async def wait_slaac_address(guest: Guest, timeout_s: int = 20) -> list[IPv6Interface]:
    """Wait (in the guest, polling, `timeout_s` at most) until eth0 has a global address
    in PREFIX_V6 that finished duplicate address detection; return eth0's global
    addresses. GuestError when none came."""
    poll = (
        "i=0; until ip -6 addr show dev eth0 scope global | grep -v tentative"
        f" | grep -q 'inet6 {PREFIX_V6.network_address}'; do"
        f" [ $i -lt {timeout_s * 5} ] || exit 1; i=$((i+1)); sleep 0.2; done"
    )
    status, _ = await guest.run(poll, timeout=timeout_s + 30)
    out = await guest.check("ip -6 addr show dev eth0")
    found = [IPv6Interface(a) for a in re.findall(r"inet6 (\S+) scope global", out)]
    if status != 0:
        raise GuestError(f"no address in {PREFIX_V6} on eth0 after {timeout_s} s:\n{out}")
    return found


def socat_udp(host: IPv4Address | IPv6Address, port: int, source_port: int | None = None) -> str:
    """A socat client address for UDP to host:port (from source_port when given)."""
    where = f"UDP4:{host}:{port}" if host.version == 4 else f"UDP6:[{host}]:{port}"
    return where + (f",sourceport={source_port}" if source_port is not None else "")


async def udp_exchange(
    guest: Guest,
    host: IPv4Address | IPv6Address,
    port: int,
    payloads: Sequence[str],
    *,
    source_port: int | None = None,
    cpu: int | None = None,
    gap: float = 0.3,
) -> str:
    """The guest sends each payload as one datagram (`gap` seconds apart) from one
    socket and prints what comes back; returns that output."""
    return await guest.check(udp_exchange_command(host, port, payloads, source_port, cpu, gap))


def udp_exchange_command(
    host: IPv4Address | IPv6Address,
    port: int,
    payloads: Sequence[str],
    source_port: int | None = None,
    cpu: int | None = None,
    gap: float = 0.3,
) -> str:
    """The shell command of :func:`udp_exchange` (to run several in parallel)."""
    lines = "; ".join(f"echo {shlex.quote(p)}; sleep {gap}" for p in payloads)
    socat = f"socat -t {SOCAT_WAIT} - {socat_udp(host, port, source_port)}"
    limit = int(SOCAT_WAIT + gap * len(payloads) + 10)
    cmd = f"({lines}) | timeout {limit} {socat}"
    if cpu is not None:
        cmd = f"taskset {1 << cpu:x} sh -c {shlex.quote(cmd)}"
    return cmd


async def nslookup(guest: Guest, name: str, server: IPv4Address | IPv6Address) -> str:
    """busybox nslookup of `name` at `server` (port 53); GuestError when it fails."""
    return await guest.check(f"timeout 30 nslookup {shlex.quote(name)} {server}", timeout=60)
