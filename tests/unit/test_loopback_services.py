"""The loopback services of the e2e tests and the demo: UDP echo and one-name DNS."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest
import trio
from scapy.layers.dns import DNS, DNSQR

from tests.e2e.loopback import (
    DNS_A,
    DNS_AAAA,
    DNS_NAME,
    DnsZone,
    LoopbackService,
    dns_server,
    serve_udp,
    udp_echo,
    udp_echo_server,
)

TIMEOUT = 5


async def exchange(host: str, port: int, payload: bytes) -> tuple[bytes, tuple[str, int]]:
    """Send one datagram from a fresh socket; return the reply and where it came from."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.sendto(payload, (host, port))
        with trio.fail_after(TIMEOUT):
            data, peer = await sock.recvfrom(65535)
    return data, (peer[0], peer[1])


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_echo_returns_the_payload_and_counts() -> None:
    async with udp_echo_server() as echo:
        assert echo.port > 0 and echo.hosts == ("127.0.0.1",)
        for payload in (b"hello", b"\x00" * 1400, b""):
            data, peer = await exchange("127.0.0.1", echo.port, payload)
            assert data == payload
            assert peer == ("127.0.0.1", echo.port)
        assert (echo.received, echo.answered) == (3, 3)
        assert len(echo.peers) == 3  # a fresh socket (source port) per exchange
        assert "3 datagram(s) from 3 sender(s), 3 answered" in echo.describe()


async def test_echo_on_both_loopbacks_shares_one_port() -> None:
    if not has_ipv6_loopback():
        pytest.fail("this host has no ::1 to bind (IPv6 disabled?)")
    async with udp_echo_server(hosts=("127.0.0.1", "::1")) as echo:
        assert (await exchange("127.0.0.1", echo.port, b"four"))[0] == b"four"
        assert (await exchange("::1", echo.port, b"six"))[0] == b"six"
        assert echo.received == 2


async def test_started_once_bound_and_refuses_non_loopback() -> None:
    async with trio.open_nursery() as nursery:
        service = await nursery.start(serve_udp, "echo", udp_echo)
        assert isinstance(service, LoopbackService)
        # bound before started(): the first datagram is not lost
        assert (await exchange("127.0.0.1", service.port, b"x"))[0] == b"x"
        nursery.cancel_scope.cancel()
    with pytest.raises(ValueError, match="not a loopback"):
        async with udp_echo_server(hosts=("0.0.0.0",)):
            pass


def query(name: str, qtype: str, qid: int = 0x1234) -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


async def ask(port: int, name: str, qtype: str) -> DNS:
    data, _ = await exchange("127.0.0.1", port, query(name, qtype))
    reply = DNS(data)
    assert reply.id == 0x1234 and reply.qr == 1
    return reply


async def test_dns_answers_a_and_aaaa_for_its_name() -> None:
    async with dns_server() as dns:
        reply = await ask(dns.port, DNS_NAME, "A")
        assert reply.rcode == 0 and reply.ancount == 1
        assert IPv4Address(reply.an[0].rdata) == DNS_A
        assert reply.an[0].rrname == f"{DNS_NAME}.".encode()
        reply = await ask(dns.port, DNS_NAME.upper() + ".", "AAAA")
        assert reply.rcode == 0 and reply.ancount == 1
        assert IPv6Address(reply.an[0].rdata) == DNS_AAAA
        assert (dns.received, dns.answered) == (2, 2)


async def test_dns_nodata_nxdomain_and_garbage() -> None:
    async with dns_server() as dns:
        reply = await ask(dns.port, DNS_NAME, "MX")
        assert reply.rcode == 0 and reply.ancount == 0  # the name exists, no MX
        reply = await ask(dns.port, "other.test", "A")
        assert reply.rcode == 3 and reply.ancount == 0  # NXDOMAIN
        # not a query: no answer, and the server keeps serving
        assert DnsZone()(b"\xff") is None
        assert DnsZone()(bytes(DNS(id=1, qr=1, qd=DNSQR(qname=DNS_NAME)))) is None
        reply = await ask(dns.port, DNS_NAME, "A")
        assert reply.ancount == 1


def test_dns_zone_is_configurable() -> None:
    zone = DnsZone(name="vm.example", a=IPv4Address("198.51.100.7"))
    reply = DNS(zone(query("VM.example", "A")) or b"")
    assert IPv4Address(reply.an[0].rdata) == IPv4Address("198.51.100.7")
    assert DNS(zone(query(DNS_NAME, "A")) or b"").rcode == 3
