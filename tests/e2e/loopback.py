"""Services on the host's loopback that a guest reaches through trionet's user backend.

* a UDP echo server: every datagram goes back to its sender unchanged;
* a DNS server for one name: ``A`` and ``AAAA`` queries for ``DnsZone.name`` get
  ``DnsZone.a`` / ``DnsZone.aaaa``, other types of that name an empty answer, any other
  name ``NXDOMAIN``. Queries are parsed and answers built with scapy's DNS layer.

Both listen only on 127.0.0.1 (and ::1 when asked), on a given or an ephemeral port, and
count what they see. Each is an async context manager yielding a :class:`LoopbackService`
(port and counters); underneath, :func:`serve_udp` follows ``nursery.start`` semantics:
``task_status.started(service)`` once every socket is bound.

The DNS answers are documentation addresses (TEST-NET-2, 2001:db8::/32): they are only
ever carried in answers, nothing contacts them.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv6Address, ip_address

import trio
from scapy.layers.dns import DNS, DNSQR, DNSRR

__all__ = [
    "DNS_A",
    "DNS_AAAA",
    "DNS_NAME",
    "DnsZone",
    "LoopbackService",
    "dns_server",
    "serve_udp",
    "udp_echo",
    "udp_echo_server",
    "udp_service",
]

DNS_NAME = "trionet.test"
DNS_A = IPv4Address("198.51.100.99")
DNS_AAAA = IPv6Address("2001:db8::99")
LOOPBACK = ("127.0.0.1",)
MAX_DATAGRAM = 65535
BIND_ATTEMPTS = 20  # an ephemeral port free on 127.0.0.1 may be taken on ::1

QTYPE_A = 1
QTYPE_AAAA = 28
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4

#: Turns one request datagram into its reply (None: no reply). Sans-IO, never raises.
Handler = Callable[[bytes], bytes | None]


@dataclass
class LoopbackService:
    """A running loopback service: where it listens and what it has seen so far."""

    name: str
    hosts: tuple[str, ...]
    port: int
    received: int = 0  # datagrams in
    answered: int = 0  # replies sent
    peers: set[tuple[str, int]] = field(default_factory=set)  # distinct senders

    def describe(self) -> str:
        where = ", ".join(
            f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}" for h in self.hosts
        )
        return (
            f"{self.name} on {where}: {self.received} datagram(s) from "
            f"{len(self.peers)} sender(s), {self.answered} answered"
        )


def udp_echo(payload: bytes) -> bytes:
    """The echo server's handler."""
    return payload


@dataclass(frozen=True, slots=True)
class DnsZone:
    """The one name the DNS server knows, and the answers it gives for it."""

    name: str = DNS_NAME
    a: IPv4Address = DNS_A
    aaaa: IPv6Address = DNS_AAAA
    ttl: int = 60

    def __call__(self, datagram: bytes) -> bytes | None:
        """The reply to one DNS query datagram; None for anything that is not a query."""
        try:
            query = DNS(datagram)
        except Exception:  # scapy raises whatever its dissectors raise on garbage
            return None
        question = query.getlayer(DNSQR)
        if query.qr != 0 or question is None:
            return None
        reply = DNS(id=query.id, qr=1, aa=1, rd=query.rd, ra=0, qd=question)
        if query.opcode != 0:
            reply.rcode = RCODE_NOTIMP
            return bytes(reply)
        qname = question.qname
        name = qname.decode(errors="replace") if isinstance(qname, bytes) else str(qname)
        if name.rstrip(".").lower() != self.name.lower():
            reply.rcode = RCODE_NXDOMAIN
            return bytes(reply)
        qtype = int(question.qtype)
        if qtype in (QTYPE_A, QTYPE_AAAA):  # other types of the name: an empty answer
            address = self.a if qtype == QTYPE_A else self.aaaa
            reply.an = DNSRR(rrname=qname, type=qtype, ttl=self.ttl, rdata=str(address))
        return bytes(reply)


async def _bind(hosts: Sequence[str], port: int) -> tuple[list[trio.socket.SocketType], int]:
    """UDP sockets bound to `port` on every host; an ephemeral port when 0 (the same
    number on every host)."""
    for _ in range(BIND_ATTEMPTS if port == 0 else 1):
        sockets: list[trio.socket.SocketType] = []
        chosen = port
        try:
            for host in hosts:
                family = socket.AF_INET if ip_address(host).version == 4 else socket.AF_INET6
                sock = trio.socket.socket(family, socket.SOCK_DGRAM)
                sockets.append(sock)
                await sock.bind((host, chosen))
                chosen = sock.getsockname()[1]
            return sockets, chosen
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if exc.errno != errno.EADDRINUSE or port != 0:
                raise
    raise OSError(errno.EADDRINUSE, f"no UDP port free on all of {', '.join(hosts)}")


async def _serve_socket(
    sock: trio.socket.SocketType, handler: Handler, service: LoopbackService
) -> None:
    with sock:
        while True:
            data, peer = await sock.recvfrom(MAX_DATAGRAM)
            service.received += 1
            service.peers.add((peer[0], peer[1]))
            reply = handler(data)
            if reply is not None:
                service.answered += 1  # before the send: the sender may look right after
                try:
                    await sock.sendto(reply, peer)
                except OSError:  # the sender is gone; keep serving the others
                    service.answered -= 1


async def serve_udp(
    name: str,
    handler: Handler,
    *,
    hosts: Sequence[str] = LOOPBACK,
    port: int = 0,
    task_status: trio.TaskStatus[LoopbackService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer datagrams on `hosts`:`port` with `handler` until cancelled; report the
    :class:`LoopbackService` through ``task_status`` once bound."""
    for host in hosts:
        if not ip_address(host).is_loopback:
            raise ValueError(f"{name}: {host} is not a loopback address")
    sockets, bound = await _bind(hosts, port)
    service = LoopbackService(name, tuple(hosts), bound)
    async with trio.open_nursery() as nursery:
        for sock in sockets:
            nursery.start_soon(_serve_socket, sock, handler, service)
        task_status.started(service)


@asynccontextmanager
async def udp_service(
    name: str, handler: Handler, *, hosts: Sequence[str] = LOOPBACK, port: int = 0
) -> AsyncIterator[LoopbackService]:
    """Run :func:`serve_udp` for the duration of the block."""
    try:
        async with trio.open_nursery() as nursery:
            service: LoopbackService = await nursery.start(
                partial(serve_udp, name, handler, hosts=hosts, port=port)
            )
            yield service
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Only the block or the start can fail (the serving tasks do not raise): unwrap
        # so that callers see the original exception rather than a one-element group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def udp_echo_server(
    port: int = 0, *, hosts: Sequence[str] = LOOPBACK
) -> AbstractAsyncContextManager[LoopbackService]:
    """The UDP echo server (``async with udp_echo_server() as echo: echo.port``)."""
    return udp_service("udp echo", udp_echo, hosts=hosts, port=port)


def dns_server(
    port: int = 0, *, hosts: Sequence[str] = LOOPBACK, zone: DnsZone = DnsZone()
) -> AbstractAsyncContextManager[LoopbackService]:
    """The one-name DNS server (UDP)."""
    return udp_service(f"dns {zone.name}", zone, hosts=hosts, port=port)
